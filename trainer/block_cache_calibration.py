"""``python -m trainer.block_cache_calibration checkpoint=<run dir> steps=25 scale=5``

Calibrates block caching (``cache=block``; Cache Me if You Can, arXiv 2312.03209) for one
trained model, step count and guidance scale: samples CFG trajectories of calibration
prompts (captions of the synthetic training split, never the held-out ones the
evaluation uses) with every block evaluated, and records each block's mean relative L1
change of its residual from one step to the next (``models.block_cache.ChangeCurves``).
The file lands beside the checkpoint, ``<run dir>/cache/block_steps<S>_scale<g>.json``,
with a hash of the weights it was measured on. It holds the curves, not a schedule: the
schedule is ``block_schedule(curves, threshold)``, a function of the calibration data
and the threshold chosen at sampling time. ``cache=block`` in ``trainer.sample`` and
``trainer.evaluate`` refuses a missing, corrupt or stale file, naming it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from models.block_cache import CacheSettings, ChangeCurves
from models.sampler import GuidedVelocity, euler_sample, linear_quadratic_schedule
from trainer.config import ConfigError
from trainer.linear_guidance import (
    CalibrationRun,
    calibration_batches,
    calibration_prompts,
    model_hash,
    read_calibration,
)
from trainer.run_config import parse_cli_options
from trainer.sampling import Cache, Guidance
from trainer.trained import TrainedRun, load_text_to_video

FORMAT = "cinetron-block-cache/1"


@dataclass
class BlockCalibrationConfig(CalibrationRun):
    prompts: int = 16

    MIN_STEPS: ClassVar[int] = 2
    WHY_MIN_STEPS: ClassVar[str] = "the linear-quadratic schedule needs two steps"


def block_calibration_path(run_dir: Path, steps: int, scale: float) -> Path:
    return Path(run_dir) / "cache" / f"block_steps{steps}_scale{scale:g}.json"


@torch.no_grad()
def calibrate_blocks(run: TrainedRun, steps: int, scale: float, prompts: list[str], seed: int,
                     batch: int) -> dict:
    """CFG on ``prompts``, every block evaluated and watched: -> the calibration record
    (each block's mean relative residual change per step, over both CFG branches)."""
    dit = run.model.dit
    curves = ChangeCurves(steps, len(dit.blocks))
    for texts, noise in calibration_batches(run, prompts, seed, batch):
        velocity = GuidedVelocity(dit, *texts, scale, "cfg")
        with CacheSettings().new_cache(curves=curves).attached(dit):
            euler_sample(velocity, noise, linear_quadratic_schedule(steps))
    change = curves.mean()
    return {"format": FORMAT, "steps": steps, "scale": scale, "depth": len(dit.blocks),
            "model_hash": model_hash(run.model), "run": str(run.run_dir), "step": run.step,
            "prompts": len(prompts), "seed": seed,
            "change": [[None if c != c else c for c in row] for row in change.tolist()]}


def load_change_curves(path: Path, model: nn.Module, steps: int, scale: float) -> torch.Tensor:
    """The (steps, depth) change curves of a calibration file for this model, steps and
    scale (row 0 NaN); anything else is refused, naming the file."""
    redo = (f"calibrate it: python -m trainer.block_cache_calibration checkpoint=<run dir> "
            f"steps={steps} scale={scale:g}")
    record = read_calibration(path, model, FORMAT, {"steps": steps, "scale": scale},
                              "cache=block", redo)
    depth = len(model.dit.blocks)
    try:
        curves = torch.tensor([[float("nan") if c is None else float(c) for c in row]
                               for row in record["change"]], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"block cache calibration file {path} is corrupt ({error!r}); "
                          f"delete it and {redo}") from error
    if curves.shape != (steps, depth) or not bool((curves[1:] >= 0).all()):
        raise ConfigError(f"block cache calibration file {path} is corrupt (change curves "
                          f"{tuple(curves.shape)} for {steps} steps of {depth} blocks, every "
                          f"value after step 0 a number >= 0); delete it and {redo}")
    return curves


def cache_settings(cache: Cache, threshold: float, guidance: Guidance, run: TrainedRun,
                   steps: int, scale: float, file: str | None = None) -> CacheSettings:
    """The sampler's cache from its options (``cache``, ``cache_threshold``,
    ``cache_file``); refuses what cannot work, naming the option."""
    if not threshold >= 0:
        raise ConfigError(f"cache_threshold={threshold} must be a number >= 0 (0 disables "
                          f"the cache)")
    if cache is not Cache.none and guidance in (Guidance.adaptive, Guidance.linear_ag):
        raise ConfigError(f"cache={cache.value} needs a batch whose rows stay the same "
                          f"every step; guidance={guidance.value} drops rows as it goes. "
                          f"Use guidance=cfg or none with a cache")
    curves = None
    if cache is Cache.block:
        path = Path(file) if file else block_calibration_path(run.run_dir, steps, scale)
        curves = load_change_curves(path, run.model, steps, scale)
    return CacheSettings(cache.value, threshold, curves)


def main(argv: list[str]) -> None:
    try:
        opts = parse_cli_options(BlockCalibrationConfig, argv, "trainer.block_cache_calibration",
                                 "checkpoint=<run dir> [steps=25 scale=5 prompts=16 ...]")
        run = load_text_to_video(Path(opts.checkpoint), torch.device(opts.device), opts.ema)
        record = calibrate_blocks(run, opts.steps, opts.scale,
                                  calibration_prompts(run, opts.prompts), opts.seed, opts.batch)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    path = (Path(opts.output) if opts.output
            else block_calibration_path(run.run_dir, opts.steps, opts.scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    change = torch.tensor([[float("nan") if c is None else c for c in row]
                           for row in record["change"]])[1:]
    print(f"{path}: relative change of a block's residual per step {change.min():.2e} to "
          f"{change.max():.2e} ({record['depth']} blocks, {opts.steps} steps, "
          f"{record['prompts']} prompts)")


if __name__ == "__main__":
    main(sys.argv[1:])
