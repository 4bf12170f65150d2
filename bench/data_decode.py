"""Decode + augment throughput of the training loader, and whether it keeps up with a step.

What it measures, in one run:
1. Per worker (one process, one sample at a time), the loader's real per-sample path,
   ``data.shards.VideoShards.load_sample`` (PyAV decode with a seek to the clip start,
   frame-rate resampling to the target fps, RGB conversion, cover-resize + centre-crop of
   the kept window with OpenCV, then normalisation to float in [-1, 1]), on clips of 2, 4,
   8 and 16 s cut (json start/end) from a 1280x720 H.264 source, at a square 256 px and
   768 px bucket. The target fps is
   the data config's 16, so a clip of s seconds gives 16 * s frames (32 ... 256: the
   duration buckets of ``conf/data/webdataset.yaml``).
2. A naive baseline on the same bytes: decode every frame of the file up to the clip end
   to full-size RGB (no seek), then keep every n-th frame at the target fps, resize
   (cv2 INTER_AREA) and centre-crop each kept frame, normalise.
   Both produce the same number of frames of the same shape; the best of the repetitions is
   reported.
3. "Does the loader keep up": ``trainer.train`` in this process with ``experiment=t2v_tiny
   data=webdataset`` and 2 DataLoader workers on shards of 720p clips, at t2v_tiny's own
   shape (8 frames of 32x32 at 8 fps, batch 8: clips of 1.2 s); the fraction of wall time
   the train loop waits in ``next(batches)`` after the first step (worker start-up and
   warm-up excluded). A second run with 0 workers (decode in the train loop) gives the step
   time without loader processes competing for the same cores.

Source clips are made once with PyAV (libx264, preset veryfast, a moving colour gradient)
into ``--cache`` (default: a folder under the system temp dir) and reused.

Run from the repository root:
    python bench/data_decode.py            # full tables, ~2.5 minutes on 2 cores
    python bench/data_decode.py --quick    # 2 and 4 s clips, 1 rep, a short train run
Progress goes to stderr, the markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `data`, `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.buckets import BucketGrid  # noqa: E402
from data.shards import VideoShards, write_shard  # noqa: E402
from data.video import uint8_to_video  # noqa: E402

SRC_W, SRC_H = 1280, 720
TARGET_FPS = 16.0
CLIP_START = 1.0  # curated clips start after the source's first second (skip_start_s)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- source clips

def gradient_frame(k: int, fps: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth colour gradient drifting right and down: cheap to make, no noise."""
    t = k / fps
    r = (x * 255 + 40 * t) % 256
    g = (y * 255 + 25 * t) % 256
    b = 128 + 100 * np.sin(2 * np.pi * (x + y + 0.2 * t))
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)


def make_source(path: Path, seconds: float, fps: float) -> bytes:
    """A 1280x720 H.264 mp4 of `seconds` at `fps`, encoded once and cached."""
    if not path.exists():
        log(f"encoding {path.name} ({seconds:g} s at {fps:g} fps, {SRC_W}x{SRC_H})")
        x = np.linspace(0, 1, SRC_W, dtype=np.float32)[None, :]
        y = np.linspace(0, 1, SRC_H, dtype=np.float32)[:, None]
        tmp = path.with_suffix(".tmp")
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = SRC_W, SRC_H, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast"}
            for k in range(round(seconds * fps)):
                frame = av.VideoFrame.from_ndarray(gradient_frame(k, fps, x, y), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        os.replace(tmp, path)
    return path.read_bytes()


# ---------------------------------------------------------------- naive baseline

def naive_decode(data: bytes, start: float, end: float, fps: float, size: int) -> torch.Tensor:
    """Decode every frame up to `end` to full-size RGB, then drop to `fps`, resize, crop."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded, times = [], []
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= end:
                break
            decoded.append(frame.to_ndarray(format="rgb24"))
            times.append(frame.time)
        src_fps = float(stream.average_rate)
    count = math.floor((end - start) * fps + 1e-6)
    slack = 0.5 / src_fps
    picked, i = [], 0
    for k in range(count):  # first source frame at or after start + k / fps - slack
        while times[i] < start + k / fps - slack:
            i += 1
        picked.append(decoded[i])
    out = []
    for image in picked:
        h, w = image.shape[:2]
        scale = max(size / h, size / w)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
        top, left = (rh - size) // 2, (rw - size) // 2
        out.append(resized[top: top + size, left: left + size])
    return uint8_to_video(torch.from_numpy(np.stack(out)))


# ---------------------------------------------------------------- decode table

def best_of(fn, reps: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def decode_table(source: bytes, sizes: list[int], clip_seconds: list[int], reps: int) -> str:
    rows = ["| output px | clip s | frames | ours clips/s | ours frames/s | naive clips/s "
            "| naive frames/s | speedup |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        for seconds in clip_seconds:
            frames = int(seconds * TARGET_FPS)
            grid = BucketGrid([[size, size]], [frames], [1], 1)
            shards = VideoShards.__new__(VideoShards)  # only load_sample: no shard list
            shards.grid, shards.fps, shards.seed, shards.weighted = grid, TARGET_FPS, 0, True
            end = CLIP_START + seconds
            members = {"mp4": source, "txt": b"a colour gradient drifts",
                       "json": json.dumps({"start": CLIP_START, "end": end}).encode()}
            ours_t, (sample, _) = best_of(
                lambda s=shards, m=members: s.load_sample("k", m, 0), reps)
            naive_t, naive = best_of(
                lambda e=end, z=size: naive_decode(source, CLIP_START, e, TARGET_FPS, z), reps)
            assert sample["video"].shape == naive.shape == (3, frames, size, size), \
                (sample["video"].shape, naive.shape)
            del sample, naive
            rows.append(f"| {size} | {seconds} | {frames} | {1 / ours_t:.2f} | "
                        f"{frames / ours_t:.0f} | {1 / naive_t:.2f} | {frames / naive_t:.0f} | "
                        f"{naive_t / ours_t:.2f}x |")
            log(rows[-1])
    return "\n".join(rows)


# ---------------------------------------------------------------- loader keeps up

def keep_up(cache: Path, source: bytes, steps: int, workers: int) -> str:
    """trainer.train on shards of 720p clips; data-wait fraction after step 1."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import trainer.train as train_module
    from trainer.config import register_configs, to_train_config
    from trainer.run_config import CONF_DIR

    shard_dir = cache / "shards_1.2s"
    if not shard_dir.exists():
        tmp = cache / "shards.tmp"
        for s in range(4):  # 4 shards x 16 clips of 1.2 s (8 frames at 8 fps + slack)
            write_shard(tmp / f"{s:06d}.tar", [
                {"__key__": f"s{s}_{i}", "mp4": source, "txt": "a colour gradient drifts",
                 "json": {"start": CLIP_START + 0.25 * (i % 8), "end": CLIP_START + 0.25 * (
                     i % 8) + 1.2}} for i in range(16)])
        os.replace(tmp, shard_dir)
    overrides = [
        "experiment=t2v_tiny", "data=webdataset",
        f"data.shards='{shard_dir}/{{000000..000003}}.tar'",
        # the synthetic set's shape (8 frames of 32x32 at 8 fps) and batch (8)
        "data.sizes=[[32,32]]", "data.durations=[8]", "data.batch_sizes=[8]", "data.fps=8",
        f"data.num_workers={workers}", f"trainer.max_steps={steps}", "trainer.log_every=1",
        "trainer.wandb.mode=disabled", "trainer.sample_prompts=[]", "trainer.progress=false",
        f"trainer.val_every={10**6}", f"trainer.ckpt_every={10**6}"]
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        raw = compose("train", overrides=overrides)
    cfg = to_train_config(raw)
    config_dict = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)

    waits: list[float] = []
    ends: list[float] = []

    class TimedMonitor(train_module.Monitor):
        @contextmanager
        def waiting_for_data(self):
            start = time.perf_counter()
            with super().waiting_for_data():
                yield
            waits.append(time.perf_counter() - start)

        def log_train_step(self, step, loss, tokens, **values):
            ends.append(time.perf_counter())
            return super().log_train_step(step, loss, tokens, **values)

    original, train_module.Monitor = train_module.Monitor, TimedMonitor
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
            log(f"trainer.train: {steps} steps, {workers} workers")
            train_module.train(cfg, Path(run_dir), config_dict)
    finally:
        train_module.Monitor = original
    # waits[0] includes worker start-up and the first batches; ends[0] the warm-up step
    wall = ends[-1] - ends[0]
    wait = sum(waits[1:])
    step_time = (wall - wait) / (len(ends) - 1)
    return (f"| {workers} | (8, 32, 32) from 1280x720 | 8 | {len(ends) - 1} | "
            f"{step_time:.3f} | {wait / (len(ends) - 1):.3f} | {wait / wall:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 4 s clips, short run")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                        "cinetron-bench-data"))
    parser.add_argument("--src-fps", type=float, default=24.0)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="train steps for keep-up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker = one core, for torch and OpenCV alike
    cv2.setNumThreads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    clip_seconds = [2, 4] if args.quick else [2, 4, 8, 16]
    reps = args.reps or (1 if args.quick else 2)
    t0 = time.perf_counter()
    seconds = CLIP_START + max(clip_seconds) + 1
    source = make_source(cache / f"src_{SRC_W}x{SRC_H}_{args.src_fps:g}fps_{seconds:g}s.mp4",
                         seconds, args.src_fps)
    log(f"source ready in {time.perf_counter() - t0:.1f} s")
    print(f"## Decode + augment per worker (1 thread), source {SRC_W}x{SRC_H} H.264 at "
          f"{args.src_fps:g} fps, target {TARGET_FPS:g} fps, best of {reps}\n")
    print(decode_table(source, [256, 768], clip_seconds, reps), flush=True)
    if not args.skip_train:
        torch.set_num_threads(os.cpu_count() or 1)
        steps = args.steps or (6 if args.quick else 16)
        print("\n## Loader keeps up: trainer.train, t2v_tiny DiT, data=webdataset\n")
        print("| workers | bucket (T, H, W) | batch | steps timed | step s (compute) | "
              "data wait s/step | data-wait fraction |\n|---:|---|---:|---:|---:|---:|---:|",
              flush=True)
        # workers=0 decodes in the train process: its compute column is the step alone,
        # without loader workers competing for the cores
        for workers in (args.workers, 0):
            print(keep_up(cache, source, steps, workers), flush=True)
    log(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
