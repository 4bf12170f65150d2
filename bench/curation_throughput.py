"""Curation throughput: clips/s and clips/s per core for the full filter chain.

What it measures, in one run:
1. The curation job end to end, ``python -m data.curate input=... output=... workers=N
   wandb=disabled config=...`` in a subprocess, with workers = 1 and 2, on N raw clips
   (default 16, in 4 shards of 4) of 6 s at 640x360, 24 fps, H.264: a smooth random texture
   panning sideways, a different texture and caption per clip. The default chain of
   ``conf/curate/default.yaml`` runs with thresholds loosened (min side, sharpness,
   text area, motion) so that every clip passes every filter: each filter runs on each
   clip, the worst case for throughput. Wall time includes interpreter start-up, the
   dataset-wide dedup, concept balancing (loading the MiniLM caption encoder) and writing
   the curated shards; the funnel is checked (all N out).
2. Pass 1 alone (the per-clip filter chain, ``data.curation.job.filter_shard`` per shard
   through the job's own ``data.curation.workers.run_jobs`` workers) with workers = 1 and 2: the
   throughput of the chain without the job's fixed costs.
3. Pass 1 in this process (one core), per filter: the same chain as the job's pass 1
   (``data.curation.job.pass1_chain``), each filter timed on each clip; the first filter
   that needs pixels pays the clip's one shared low-res decode.

Run from the repository root:
    python bench/curation_throughput.py            # 16 clips, ~1.5 minutes on 2 cores
    python bench/curation_throughput.py --clips 48 # as in RESULTS.md, ~2 minutes
    python bench/curation_throughput.py --quick    # 4 clips
Progress goes to stderr, the markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `data` importable
    sys.path.insert(0, str(ROOT))

from data.curate import DEFAULT_CONFIG, work_name  # noqa: E402
from data.curation import Clip  # noqa: E402
from data.curation.job import filter_shard, pass1_chain  # noqa: E402
from data.curation.workers import run_jobs  # noqa: E402
from data.shards import write_shard  # noqa: E402

W, H, FPS, SECONDS = 640, 360, 24, 6.0
PER_SHARD = 4
WORDS = ["red", "blue", "green", "grey", "bright", "dark", "soft", "rough", "wall", "field",
         "cloud", "stone", "water", "sand", "leaf", "metal"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pan_clip(seed: int, path: Path, cell: int = 24, speed: int = 3) -> bytes:
    """A smooth random texture panning `speed` px per frame, as H.264 (preset veryfast)."""
    frames = int(SECONDS * FPS)
    rng = np.random.default_rng(seed)
    knots = rng.integers(0, 256, (H // cell + 1, (W + speed * frames) // cell + 2, 3),
                         dtype=np.uint8)
    strip = cv2.resize(knots, (knots.shape[1] * cell, knots.shape[0] * cell),
                       interpolation=cv2.INTER_CUBIC)[:H]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for k in range(frames):
            image = np.ascontiguousarray(strip[:, speed * k: speed * k + W])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


def caption(i: int) -> str:
    rng = np.random.default_rng(1000 + i)
    return "a " + " ".join(rng.choice(WORDS, 6)) + f" texture number {i} pans to the left"


def make_raw(folder: Path, count: int) -> list[Path]:
    """`count` clips in shards of PER_SHARD; cached in `folder`."""
    shards = [folder / f"{s:06d}.tar" for s in range((count + PER_SHARD - 1) // PER_SHARD)]
    if all(p.exists() for p in shards):
        return shards
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for s, shard in enumerate(shards):
            keys = range(s * PER_SHARD, min(count, (s + 1) * PER_SHARD))
            write_shard(shard, [{"__key__": f"clip{i:04d}",
                                 "mp4": pan_clip(i, Path(tmp) / f"{i}.mp4"),
                                 "txt": caption(i), "json": {"source": "bench"}} for i in keys])
    return shards


def bench_config(path: Path, num_clusters: int) -> Path:
    """The default chain, thresholds loosened so every generated clip passes every filter."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    loosen = {"resolution": {"min_side": 256}, "sharpness": {"min_var": 0.0, "max_var": 1e9},
              "text_area": {"max_score": 1.0}, "motion": {"min_motion": 0.0, "max_motion": 255.0}}
    for spec in cfg["filters"]:
        spec.update(loosen.get(spec["name"], {}))
    cfg["balance"]["num_clusters"] = num_clusters
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_job(raw: Path, count: int, out: Path, config: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    last = (count + PER_SHARD - 1) // PER_SHARD - 1
    args = [f"input={raw}/{{000000..{last:06d}}}.tar", f"output={out}", f"config={config}",
            "wandb=disabled", f"workers={workers}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "data.curate", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"data.curate failed:\n{result.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    if report["samples_out"] != count:
        removed = {k: v for k, v in report["filters"].items() if v["samples"]}
        log(f"warning: {count - report['samples_out']} clips dropped: {removed}")
    return wall


def pass1(raw: Path, config: Path, count: int, workers: int) -> float:
    """Wall seconds of the job's pass 1 alone (``filter_shard`` per shard through the job's
    own process pool), without the job's fixed costs."""
    specs = yaml.safe_load(config.read_text())
    shards = sorted(raw.glob("*.tar"))
    with tempfile.TemporaryDirectory() as work:
        jobs = [(p.name, str(p), os.path.join(work, work_name(p.name, str(p))), specs["filters"],
                 specs["analysis"], specs["max_member_bytes"]) for p in shards]
        start = time.perf_counter()
        run_jobs(filter_shard, jobs, [p.name for p in shards], workers)
        return time.perf_counter() - start


def pool_startup(workers: int) -> float:
    """Seconds for the job's spawn pool to start `workers` processes and run a no-op in each
    (each child imports this script, hence data.curation: torch, cv2, scenedetect)."""
    start = time.perf_counter()
    run_jobs(os.getpid, [()] * workers, [str(i) for i in range(workers)], workers)
    return time.perf_counter() - start


def per_filter(raw: Path, config: Path, count: int) -> tuple[dict[str, float], int]:
    """Seconds per clip for each pass-1 stage, in this process."""
    import tarfile

    specs = yaml.safe_load(config.read_text())
    analysis = specs["analysis"]
    chain = pass1_chain(specs["filters"])
    totals: dict[str, float] = defaultdict(float)
    kept = 0
    with tempfile.TemporaryDirectory() as tmp:
        for shard in sorted(raw.glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
            for name, data in members.items():
                if not name.endswith(".mp4"):
                    continue
                key = name.split(".")[0]
                path = os.path.join(tmp, f"{key}.mp4")
                Path(path).write_bytes(data)
                clip = Clip(path, members[f"{key}.txt"].decode(),
                            analysis_fps=analysis["fps"], max_side=analysis["max_side"], key=key)
                for filt in chain:
                    start = time.perf_counter()
                    decision = filt(clip)
                    totals[filt.name] += time.perf_counter() - start
                    if not decision.keep:
                        break
                    if decision.window is not None:
                        clip = clip.window(*decision.window)
                    if decision.split is not None:  # the bench's clips are single shots
                        clip = clip.window(*decision.split[0])
                else:
                    kept += 1
    return {name: t / count for name, t in totals.items()}, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 clips")
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                        "cinetron-bench-curation"))
    args = parser.parse_args()
    count = args.clips or (4 if args.quick else 16)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    raw = cache / f"raw_{count}"
    make_raw(raw, count)
    log(f"{count} raw clips ready in {time.perf_counter() - t0:.1f} s")
    config = bench_config(cache / "curate.yaml", num_clusters=max(2, count // 4))

    rows = ["| workers | clips | wall s | clips/s | clips/s/core |", "|---:|---:|---:|---:|---:|"]
    for workers in (1, 2):
        log(f"data.curate workers={workers}")
        wall = run_job(raw, count, cache / f"out_w{workers}", config, workers)
        rows.append(f"| {workers} | {count} | {wall:.1f} | {count / wall:.2f} | "
                    f"{count / wall / workers:.2f} |")
        log(rows[-1])
    print(f"## Curation job end to end: {count} clips of {SECONDS:g} s, {W}x{H} at {FPS} fps "
          f"(H.264), full default chain, every clip kept\n")
    print("\n".join(rows), flush=True)

    rows = ["| workers | clips | pass 1 s | clips/s | clips/s/core |",
            "|---:|---:|---:|---:|---:|"]
    for workers in (1, 2):
        log(f"pass 1, workers={workers}")
        wall = pass1(raw, config, count, workers)
        rows.append(f"| {workers} | {count} | {wall:.1f} | {count / wall:.2f} | "
                    f"{count / wall / workers:.2f} |")
        log(rows[-1])
    print(f"\n(2-process spawn pool start-up alone, no work: {pool_startup(2):.1f} s)")
    print("\n## Pass 1 only (the per-clip filter chain; the job's worker pool, spawn start-up "
          "included)\n")
    print("\n".join(rows), flush=True)

    log("per-filter timing, pass 1 in process")
    times, kept = per_filter(raw, config, count)
    total = sum(times.values())
    print(f"\n## Pass 1 per filter, one core ({kept}/{count} clips passed every stage)\n")
    print("| stage | ms/clip | share |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / total:.0%} |")
    print(f"| **pass 1 total** | {total * 1e3:.1f} | 100% (= {1 / total:.2f} clips/s/core) |")
    log(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
