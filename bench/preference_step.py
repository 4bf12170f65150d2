"""What a preference-tuning step (``recipe=preference``) costs against a plain SFT step: time
and memory of the whole training step, with Diffusion-DPO's extra reference forward.

Each point runs the product path, ``trainer.train.train_step`` (the task's loss, backward,
grad-norm clip, AdamW, EMA) of the t2v_tiny DiT (width 128, depth 4, identity autoencoder)
on 8-frame 32 x 32 px clips (512 tokens per clip), in one process, fp32, on one thread:

- SFT on 4 clips and on 8 clips (``TextToVideoTask``): 8 clips are as many rows through the
  policy as 4 pairs;
- SimPO on 4 pairs: one policy forward/backward of the 8 rows [preferred; rejected];
- Diffusion-DPO on 4 pairs: the same plus a no-grad forward of the 8 rows through the
  frozen reference (loaded from a ``trainer.init_from`` file of the fresh weights).

Every point runs in a fresh process (random weights: cost does not depend on them) and
reports the step's CPU seconds (``time.process_time``, best of ``--steps`` after one
warm-up step: on a shared machine the wall clock also counts other processes' time,
printed beside it), the peak of live tensor memory during one step
(``bench._mesh.LiveBytes``: activations, gradients and temporaries the step allocates;
weights and optimizer state, allocated before, are not counted), the growth of the
process's peak RSS over one warm-up step, and the weights each variant holds (policy, and
the reference for DPO).

    python bench/preference_step.py              # ~1 min of CPU time
    python bench/preference_step.py --steps 10
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

from safetensors.torch import save_file  # noqa: E402

from bench._mesh import LiveBytes, compose, peak_rss_mib, rss_mib, run_point  # noqa: E402

THREADS = 1  # CPU time of one thread is the step time on one idle core
CLIP = ["data.frames=8", "data.height=32", "data.width=32"]
PAIRS = ["data=preference", "data.shards=unused.tar", "data.sizes=[[32,32]]",
         "data.batch_sizes=[4]", "data.image_batch_size=4",
         "data.durations=[8]", "data.fps=8", "recipe=preference", "recipe.beta=100"]
VARIANTS = [  # (name, clips through the policy, overrides)
    ("SFT, 4 clips", 4, [*CLIP, "recipe.batch_size=4"]),
    ("SFT, 8 clips", 8, [*CLIP, "recipe.batch_size=8"]),
    ("SimPO, 4 pairs", 8, [*PAIRS, "recipe.batch_size=4", "recipe.loss=simpo"]),
    ("DPO, 4 pairs", 8, [*PAIRS, "recipe.batch_size=4", "recipe.loss=dpo"]),
]


def weights_file(folder: Path) -> str:
    """The fresh t2v_tiny weights, for DPO's trainer.init_from (the reference)."""
    from trainer.build import build_model, single_process

    path = folder / "init.safetensors"
    model = build_model(compose(["trainer.wandb.mode=disabled"]),
                        single_process(torch.device("cpu")))
    save_file(model.state_dict(), str(path))
    return str(path)


def measure(overrides: list[str], steps: int) -> dict[str, float]:
    """In a fresh process: RSS growth of the first step, best step time, peak live bytes."""
    from parallel.engine import NativeEngine
    from trainer.build import single_process
    from trainer.ema import EMA
    from trainer.init_from import initialise_from
    from trainer.optim import build_optimizer
    from trainer.preference_config import PreferenceRecipeConfig
    from trainer.tasks import build_task
    from trainer.train import train_step

    torch.set_num_threads(THREADS)
    cfg = compose(overrides)
    ctx = single_process(torch.device("cpu"))
    task = build_task(cfg, ctx)
    model = task.build_model()
    initialise_from(cfg, model, None, is_main=False)
    engine = NativeEngine(model, lambda p: build_optimizer(p, cfg.recipe, 1000, fused=True))
    ema = EMA(engine.ema_tensors(), 0.99)
    count = cfg.recipe.batch_size
    data = torch.Generator().manual_seed(0)
    shape = (count, 3, 8, 32, 32)
    captions = ["a red square moving left slowly"] * count
    if isinstance(cfg.recipe, PreferenceRecipeConfig):
        batch = {"video_win": torch.rand(shape, generator=data) * 2 - 1,
                 "video_lose": torch.rand(shape, generator=data) * 2 - 1, "caption": captions}
    else:
        batch = {"video": torch.rand(shape, generator=data) * 2 - 1, "caption": captions}

    def step(number: int) -> None:
        train_step(cfg, number, batch, engine, task, ema, ctx)

    gc.collect()
    before = rss_mib()
    step(1)  # also builds DPO's reference
    rss_growth = peak_rss_mib() - before
    cpu, wall = [], []
    for number in range(2, steps + 2):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        step(number)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    gc.collect()
    with LiveBytes() as live:
        step(steps + 2)
    reference = getattr(task, "reference", None)
    held = [model] + ([reference] if reference is not None else [])
    weights = sum(p.numel() * p.element_size() for m in held for p in m.parameters())
    return {"cpu": min(cpu), "wall": min(wall), "live_mib": live.peak / 2**20,
            "rss_mib": rss_growth, "weights_mib": weights / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(*json.loads(args.point))))
        return
    print(f"train_step of t2v_tiny on 8 x 32 x 32 px clips (512 tokens each), fp32, {THREADS} "
          f"thread, best of {args.steps} steps\n\n"
          f"| variant | clips through the policy | step, CPU (s) | x SFT 8 clips | wall (s) | "
          f"peak live tensors (MiB) | x SFT 8 clips | peak RSS growth (MiB) | weights held "
          f"(MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"trainer.init_from={weights_file(Path(tmp))}"
        results = {}
        for name, _, extra in VARIANTS:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            results[name] = run_point(__file__, ["trainer.wandb.mode=disabled", init, *extra],
                                      args.steps)
        base = results["SFT, 8 clips"]
        for name, rows, _ in VARIANTS:
            r = results[name]
            print(f"| {name} | {rows} | {r['cpu']:.3f} | {r['cpu'] / base['cpu']:.2f} | "
                  f"{r['wall']:.3f} | {r['live_mib']:,.1f} | "
                  f"{r['live_mib'] / base['live_mib']:.2f} | {r['rss_mib']:,.0f} | "
                  f"{r['weights_mib']:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
