"""What the pixel-space loss (``recipe.pixel_loss``, arXiv 2409.17565) costs per training step:
time and memory of latent-only against latent + pixel loss, with and without the memory
controls (a latent-frame subset, a crop, checkpointing inside the decoder, a bf16 decoder).

The step is the product path's loss and backward, no optimizer (AdamW does not depend on
the loss): ``TextToVideoTask.loss`` (flow-matching loss on the frozen TAE's latents, plus
the pixel term through the frozen decoder) and ``backward``, in one process, fp32, on one
thread. The latents are encoded once before the timing, as a latent cache would give them.
Two sizes:

- tiny: the t2v_tiny DiT (width 128, depth 4) on ``tae_tiny`` latents (4x in T/H/W, 8
  channels), batch 4 x 8 frames x 32 x 32 px (2 x 8 x 8 latent, 32 tokens per sample);
- 1b-slice: dit_1b's width (1536, 16 heads, FFN 4096) at depth 2 of 24, on a TAE of Movie
  Gen's geometry (8x in T/H/W, 16 channels, 4 levels) slimmed to ``base_channels=32`` of 128
  (1/16 of its FLOPs: the full decoder's backward at 256 px would take minutes per step on
  this CPU), batch 1 x 16 frames x 256 x 256 px (2 x 32 x 32 latent, 512 tokens).

Every point runs in a fresh process (random weights: cost does not depend on them) and
reports: the step's CPU seconds on one thread (``time.process_time``, the best of
``--steps`` after one warm-up step: on a shared machine the wall clock also counts other
processes' time slices, CPU time much less so; wall seconds are printed beside it); the peak of live
tensor memory during one step (``bench._mesh.LiveBytes``: bytes of the storages the step's
ops allocate and that are alive at once, activations + gradients + temporaries, parameters
and inputs not counted); and the growth of the process's peak RSS (``getrusage`` max RSS)
over its RSS before the first step, which adds the allocator's slack.

    python bench/pixel_loss.py                   # both sizes, ~20 min of CPU time
    python bench/pixel_loss.py --quick           # tiny only, ~2 min (the bf16 row is most of it)
    python bench/pixel_loss.py --size 1b-slice
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench._mesh import (  # noqa: E402
    TINY_TEXT,
    LiveBytes,
    compose,
    peak_rss_mib,
    rss_mib,
    run_point,
)

THREADS = 1  # CPU time of one thread is the step time on one idle core
SIZES = {
    "tiny": {"overrides": ["autoencoder=tae_tiny", "model.in_channels=8", "data.frames=8",
                           "data.height=32", "data.width=32", "recipe.batch_size=4"],
             "crop": [16, 16], "steps": 5},
    "1b-slice": {"overrides": ["model=dit_1b", "model.depth=2", "autoencoder=tae_movie_gen",
                               "autoencoder.base_channels=32", "data.frames=16",
                               "data.height=256", "data.width=256", "recipe.batch_size=1"],
                 "crop": [128, 128], "steps": 1},
}


def variants(crop: list[int]) -> list[tuple[str, list[str]]]:
    pixel = ["recipe.pixel_loss.weight=8"]
    crop = f"recipe.pixel_loss.crop=[{crop[0]},{crop[1]}]"
    return [
        ("latent only", []),
        ("+ pixel", pixel),
        ("+ pixel, 1 latent frame", [*pixel, "recipe.pixel_loss.frames=1"]),
        ("+ pixel, checkpointed decoder", [*pixel, "recipe.pixel_loss.checkpointing=true"]),
        ("+ pixel, 1 frame + checkpointed", [*pixel, "recipe.pixel_loss.frames=1",
                                             "recipe.pixel_loss.checkpointing=true"]),
        ("+ pixel, 1 frame + half crop + checkpointed",
         [*pixel, "recipe.pixel_loss.frames=1", crop, "recipe.pixel_loss.checkpointing=true"]),
        ("+ pixel, bf16 decoder", [*pixel, "recipe.pixel_loss.dtype=bf16"]),
    ]


def random_tae(folder: Path, overrides: list[str]) -> list[str]:
    """Seeded random TAE weights as the safetensors file ``autoencoder.checkpoint`` wants."""
    path = folder / "tae.safetensors"
    path.write_bytes(b"")  # the config check wants the file to exist
    overrides = [*overrides, f"autoencoder.checkpoint={path}"]
    autoencoder = instantiate(compose(overrides).autoencoder)
    autoencoder.init_weights(0)
    save_file(autoencoder.state_dict(), path)
    return overrides


def measure(overrides: list[str], steps: int) -> dict[str, float]:
    """In a fresh process: RSS growth of the first step, best step time, peak live bytes."""
    from trainer.build import single_process
    from trainer.draws import StepDraws
    from trainer.t2v_task import TextToVideoTask

    torch.set_num_threads(THREADS)
    cfg = compose(overrides)
    task = TextToVideoTask(cfg, single_process(torch.device("cpu")))
    model = task.build_model()
    data = cfg.data
    shape = (cfg.recipe.batch_size, 3, data.frames, data.height, data.width)
    batch = {"video": torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "caption": ["a red square moving left"] * shape[0]}
    rows = slice(0, shape[0])
    # The latents are encoded once, as from a cache (data=latents): the encoder's cost is
    # the same with or without the pixel loss and would only dilute the comparison.
    latent = task.autoencoder.encode(batch["video"])
    task.latents_and_text = lambda batch: (latent, batch["caption"])

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, batch, StepDraws(seed=1, step=1), rows, shape[0], 1)
        loss.backward()

    gc.collect()
    before = rss_mib()
    step()
    rss_growth = peak_rss_mib() - before
    cpu, wall = [], []
    for _ in range(steps):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    model.zero_grad(set_to_none=True)
    gc.collect()
    with LiveBytes() as live:
        step()
    return {"cpu": min(cpu), "wall": min(wall), "live_mib": live.peak / 2**20,
            "rss_mib": rss_growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny size only")
    parser.add_argument("--steps", type=int, help="timed steps per point (5 tiny, 1 1b-slice)")
    parser.add_argument("--size", choices=list(SIZES), help="one size only")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(*json.loads(args.point))))
        return
    sizes = ["tiny"] if args.quick else [args.size] if args.size else list(SIZES)
    print(f"Loss + backward of one step, fp32, {THREADS} thread; pixel weight 8, target noise")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            base = random_tae(Path(tmp), [*TINY_TEXT, *SIZES[size]["overrides"]])
            steps = args.steps or SIZES[size]["steps"]
            print(f"\n{size}, best of {steps} steps\n\n| variant | step, CPU (s) | x latent "
                  f"| wall (s) | peak live tensors (MiB) | x latent | peak RSS growth (MiB) |\n"
                  f"|---|---|---|---|---|---|---|")
            first = None
            for name, extra in variants(SIZES[size]["crop"]):
                if "bf16" in name and size != "tiny":
                    continue  # bf16 backward kernels are ~25x slower than fp32 on this CPU
                print(f"  {size}: {name} ...", file=sys.stderr, flush=True)
                r = run_point(__file__, [*base, *extra], steps)
                first = first or r
                print(f"| {name} | {r['cpu']:.2f} | {r['cpu'] / first['cpu']:.2f} | "
                      f"{r['wall']:.2f} | {r['live_mib']:,.0f} | "
                      f"{r['live_mib'] / first['live_mib']:.1f} | {r['rss_mib']:,.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
