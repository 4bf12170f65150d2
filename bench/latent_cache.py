"""DiT training-step time from cached latents (``data=latents``) against online encoding
(``data=webdataset``: PyAV decode + autoencoder + frozen text encoders in the step).

It writes real mp4 tar shards, precomputes them with ``trainer.precompute`` (in process),
then times whole steps of the real loop pieces (``trainer.train.train_step`` with the next
batch fetched inside the timing, DataLoader in-process) for the tiny DiT, with the identity
autoencoder and with a tiny TAE (random weights exported to safetensors, as
``autoencoder.checkpoint`` expects). Mean of the timed steps after warm-up, the two
runs' steps interleaved.

    python bench/latent_cache.py [--steps 12] [--size 64] [--frames 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.utils import instantiate  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench._mesh import compose as compose_train  # noqa: E402
from data.shards import write_shard  # noqa: E402
from data.video import write_video  # noqa: E402
from trainer.build import single_process  # noqa: E402
from trainer.data import build_train_batches  # noqa: E402
from trainer.ema import EMA  # noqa: E402
from trainer.precompute import precompute  # noqa: E402
from trainer.tasks import build_task  # noqa: E402
from trainer.train import build_engine, train_step  # noqa: E402

SHARDS, PER_SHARD = 4, 8


def make_raw_shards(folder: Path, size: int, frames: int) -> str:
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        samples = []
        for i in range(PER_SHARD):
            video = folder / f"{s}_{i}.mp4"
            pixels = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
            write_video(video, pixels, fps=8.0)
            samples.append({"__key__": f"s{s}_{i}", "mp4": video.read_bytes(),
                            "txt": f"clip {i} of shard {s}, a moving pattern"})
        write_shard(folder / f"{s:06d}.tar", samples)
    return str(folder / f"{{000000..{SHARDS - 1:06d}}}.tar")


def tae_checkpoint(folder: Path, raw: str, overrides: list[str]) -> list[str]:
    """A tiny TAE's seeded random weights as a safetensors file, and the overrides."""
    path = folder / "tae.safetensors"
    path.write_bytes(b"")  # the config check wants the file to exist
    ae = [*overrides, "autoencoder=tae_tiny", f"autoencoder.checkpoint={path}",
          "model.in_channels=8"]
    cfg = compose_train(["data=webdataset", f"data.shards='{raw}'", *ae])
    autoencoder = instantiate(cfg.autoencoder)
    autoencoder.init_weights(0)
    save_file(autoencoder.state_dict(), path)
    return ae


def timed_steps(overrides: list[str]) -> Iterator[float]:
    """Seconds of each training step (next batch + train_step) of a run of `overrides`."""
    cfg = compose_train(overrides)
    ctx = single_process(torch.device("cpu"))
    torch.manual_seed(0)
    task = build_task(cfg, ctx)
    engine = build_engine(cfg, task.build_model(), ctx)
    ema = EMA(engine.ema_tensors(), cfg.recipe.ema_decay)
    batches = iter(build_train_batches(cfg, None, ctx))
    for step in count(1):
        start = time.perf_counter()
        train_step(cfg, step, next(batches), engine, task, ema, ctx)
        yield time.perf_counter() - start


def compare(online: list[str], cached: list[str], steps: int, warmup: int = 2
            ) -> tuple[float, float]:
    """Mean step seconds of both runs, their steps interleaved so that load from other
    processes on a shared machine hits both alike."""
    runs = [timed_steps(online), timed_steps(cached)]
    times = [[next(run) for run in runs] for _ in range(warmup + steps)][warmup:]
    return tuple(float(np.mean(column)) for column in zip(*times, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = make_raw_shards(tmp, args.size, args.frames)
        common = [f"data.sizes=[[{args.size},{args.size}]]", f"data.durations=[{args.frames}]",
                  f"data.batch_sizes=[{args.batch}]", "data.fps=8", "data.num_workers=0",
                  "trainer.progress=false", "recipe.caption_dropout=0.1"]
        rows = []
        for name, ae in (("identity (s2d 2)", []), ("tae_tiny", None)):
            ae = tae_checkpoint(tmp, raw, common) if ae is None else common
            cache = tmp / f"cache_{len(rows)}"
            precompute(compose_train(["data=webdataset", f"data.shards='{raw}'", *ae]),
                       str(cache))
            online, cached = compare(
                ["data=webdataset", f"data.shards='{raw}'", *ae],
                ["data=latents", f"data.shards='{cache}/{{000000..{SHARDS - 1:06d}}}.tar'",
                 *ae], args.steps)
            rows.append((name, online, cached))
    print(f"\ntiny DiT, batch {args.batch} x {args.frames} frames x {args.size}^2, "
          f"{torch.get_num_threads()} threads, mean of {args.steps} steps\n")
    print("| autoencoder | online encoding (ms/step) | cached latents (ms/step) | speedup |")
    print("|---|---|---|---|")
    for name, online, cached in rows:
        print(f"| {name} | {online * 1e3:.0f} | {cached * 1e3:.0f} | {online / cached:.2f}x |")


if __name__ == "__main__":
    main()
