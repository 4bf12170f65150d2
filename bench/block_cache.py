"""Block caching against the uncached sampler on a trained run, over thresholds.

    python bench/block_cache.py checkpoint=runs/exp_f16pt2 [prompts=16 steps=25 ...]
        ["block=[0.1,0.2]" "first_block=[0.05]" "teacache=[0.1]"]

Calibrates ``cache=block`` first (``trainer.block_cache_calibration`` on ``calibration``
captions of the training split; the file goes to a temporary directory and is read back
through the same checks ``trainer.sample`` applies, so runs/ is only read), then samples
the first ``prompts`` held-out captions with CFG at ``steps`` uncached and under each
cache mode at each threshold, all with the same noise per prompt and EMA weights. One row
per sampler: DiT block evaluations per video and how many times fewer than uncached, wall
time and process CPU time per video and their speed-ups (the CPU time is the steadier
one on a shared machine), PSNR and SSIM against the uncached video of the same prompt
and noise, the judges' match rates, and whether the row meets the target: >= 1.5x fewer
block evaluations and >= 1.4x lower wall time at PSNR >= 28 dB against uncached.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf

from data.judges import ATTRIBUTES
from models.block_cache import CacheSettings
from trainer.block_cache_calibration import (
    block_calibration_path,
    calibrate_blocks,
    load_change_curves,
)
from trainer.evaluate import SamplerSpec, held_out_clips, sample_set, score, warm_up
from trainer.frechet import feature_extractor
from trainer.linear_guidance import calibration_prompts
from trainer.peak_memory import PeakMemory
from trainer.sampling import Guidance
from trainer.text_following import held_out_prompts
from trainer.trained import load_text_to_video

MIN_BLOCK_RATIO, MIN_WALL_RATIO, MIN_PSNR_DB = 1.5, 1.4, 28.0


@dataclass
class Options:
    checkpoint: str = MISSING
    block: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8])
    first_block: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    teacache: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])
    steps: int = 25
    scale: float = 5.0
    prompts: int = 16
    calibration: int = 16   # training-split captions the block schedule is measured on
    seed: int = 1234
    batch: int = 8
    json_out: str | None = None


def verdict(row: dict) -> str:
    misses = []
    if row["block_ratio"] < MIN_BLOCK_RATIO:
        misses.append(f"blocks {row['block_ratio']:.2f}x < {MIN_BLOCK_RATIO}x")
    if row["wall_ratio"] < MIN_WALL_RATIO:
        misses.append(f"wall {row['wall_ratio']:.2f}x < {MIN_WALL_RATIO}x")
    if row["psnr_db"] < MIN_PSNR_DB:
        misses.append(f"PSNR {row['psnr_db']:.1f} < {MIN_PSNR_DB:g} dB")
    return "met" if not misses else "not met: " + "; ".join(misses)


def markdown(rows: list[dict]) -> str:
    head = ("| sampler | blocks/video | fewer blocks | s/video (wall) | wall speed-up | "
            "CPU s/video | CPU speed-up | PSNR vs uncached (dB) | SSIM | "
            + " | ".join(ATTRIBUTES) + " | target |")
    lines = [head, "|---|" + "---:|" * (8 + len(ATTRIBUTES)) + "---|"]
    for row in rows:
        psnr = "-" if row["psnr_db"] is None else f"{row['psnr_db']:.2f}"
        ssim = "-" if row["ssim"] is None else f"{row['ssim']:.4f}"
        lines.append(
            f"| {row['sampler']} | {row['block_evaluations_per_video']:.1f} | "
            f"{row['block_ratio']:.2f}x | {row['seconds_per_video']:.3f} | "
            f"{row['wall_ratio']:.2f}x | {row['cpu_seconds_per_video']:.3f} | "
            f"{row['cpu_ratio']:.2f}x | {psnr} | {ssim} | "
            + " | ".join(f"{row[a]:.0%}" for a in ATTRIBUTES)
            + f" | {row.get('verdict', '-')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    opts: Options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Options),
                                                        OmegaConf.from_cli(argv)))
    run = load_text_to_video(Path(opts.checkpoint), torch.device("cpu"))
    cpu_start = time.process_time()
    record = calibrate_blocks(run, opts.steps, opts.scale,
                              calibration_prompts(run, opts.calibration), 0, opts.batch)
    with tempfile.TemporaryDirectory() as scratch:
        path = block_calibration_path(Path(scratch), opts.steps, opts.scale)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
        curves = load_change_curves(path, run.model, opts.steps, opts.scale)
    print(f"calibration: {opts.calibration} prompts, {time.process_time() - cpu_start:.0f} "
          f"CPU s; mean relative residual change per step (rows: blocks):")
    for block, curve in enumerate(curves.T):
        print(f"  block {block}: " + " ".join(f"{c:.3f}" for c in curve[1:].tolist()))

    prompts = held_out_prompts(run.cfg.data, opts.prompts)
    extractor = feature_extractor("auto", run.task.autoencoder)
    real_features = extractor.features(held_out_clips(run.cfg.data, opts.prompts))
    memory = PeakMemory(torch.device("cpu"))
    warm_up(run, prompts[:opts.batch], opts.scale, opts.seed)
    specs = [SamplerSpec(Guidance.cfg, opts.steps, opts.scale)]
    for mode in ("block", "first_block", "teacache"):
        specs += [SamplerSpec(Guidance.cfg, opts.steps, opts.scale,
                              cache=CacheSettings(mode, threshold,
                                                  curves if mode == "block" else None))
                  for threshold in getattr(opts, mode)]
    rows, uncached = [], None
    for spec in specs:
        cpu_start = time.process_time()
        sampled = sample_set(run, spec, prompts, opts.seed, opts.batch, memory)
        cpu = (time.process_time() - cpu_start) / len(prompts)
        reference = None if uncached is None else uncached[0].videos
        row = score(spec, sampled, prompts, reference, reference, real_features, extractor)
        row["cpu_seconds_per_video"] = cpu
        if uncached is None:
            uncached = sampled, row
        base = uncached[1]
        row["block_ratio"] = (base["block_evaluations_per_video"]
                              / row["block_evaluations_per_video"])
        row["wall_ratio"] = base["seconds_per_video"] / row["seconds_per_video"]
        row["cpu_ratio"] = base["cpu_seconds_per_video"] / cpu
        if reference is not None:
            row["verdict"] = verdict(row)
        rows.append(row)
        print(f"  {spec.name}: {row['block_evaluations_per_video']:.1f} blocks/video, "
              f"{row['seconds_per_video']:.3f} wall s/video, {cpu:.3f} CPU s/video, PSNR "
              f"{row['psnr_db']} dB", file=sys.stderr)
    print(f"\n{opts.prompts} held-out prompts, seed {opts.seed}, CFG scale {opts.scale:g}, "
          f"{opts.steps} steps, batches of {opts.batch}, EMA weights of {run.run_dir} at step "
          f"{run.step}; {len(run.model.dit.blocks)} blocks per DiT call, a CFG step runs 2 "
          f"rows per video.\n")
    print(markdown(rows))
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps({"options": OmegaConf.to_container(
            OmegaConf.structured(opts)), "curves": record["change"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
