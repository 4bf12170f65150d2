"""``python -m trainer.linear_guidance checkpoint=<run dir> steps=25 scale=5``

Calibrates LinearAG (arXiv 2312.12487) for one trained model, step count and guidance
scale: samples CFG trajectories of calibration prompts (captions of the synthetic
training split, never the held-out ones the evaluation uses) and fits, for every other
step, the coefficients that predict the unconditional velocity from the conditional one
and the previous step's (``models.sampler.LinearGuidanceFit``). The file lands beside the
checkpoint, ``<run dir>/guidance/linear_ag_steps<S>_scale<g>.json``, with a hash of the
weights it was fitted on; ``guidance=linear_ag`` in ``trainer.sample`` and
``trainer.evaluate`` reads it and refuses a missing, corrupt or stale (other weights)
file, naming it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import MISSING
from torch import nn

from data.synthetic import SyntheticVideos
from models.sampler import (
    GuidedVelocity,
    LinearGuidanceFit,
    alternate_steps,
    euler_sample,
    linear_quadratic_schedule,
)
from trainer.config import ConfigError, SyntheticDataConfig
from trainer.run_config import parse_cli_options
from trainer.trained import TrainedRun, load_text_to_video

FORMAT = "cinetron-linear-ag/1"


@dataclass
class CalibrationRun:
    """What a sampler calibration CLI asks for: the run, the sampler it is calibrated for
    (steps, guidance scale) and the calibration trajectories."""

    checkpoint: str = MISSING
    steps: int = 25
    scale: float = 5.0
    prompts: int = 32     # calibration trajectories
    seed: int = 0
    batch: int = 8
    output: str | None = None   # default: a file of the method's own beside the run
    ema: bool = True
    device: str = "cpu"

    MIN_STEPS: ClassVar[int] = 3
    WHY_MIN_STEPS: ClassVar[str] = "LinearAG predicts every other step after the first"

    def __post_init__(self) -> None:
        if self.steps < self.MIN_STEPS:
            raise ConfigError(f"steps={self.steps} must be >= {self.MIN_STEPS} "
                              f"({self.WHY_MIN_STEPS})")
        if self.prompts < 1 or self.batch < 1:
            raise ConfigError(f"prompts={self.prompts} and batch={self.batch} must be >= 1")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter's name, shape and bytes, in name order; a model sharded
    on a mesh hashes as the whole one (every rank must call this: shards are gathered)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
        whole = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        digest.update(whole.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def calibration_path(run_dir: Path, steps: int, scale: float) -> Path:
    return Path(run_dir) / "guidance" / f"linear_ag_steps{steps}_scale{scale:g}.json"


def calibration_prompts(run: TrainedRun, count: int) -> list[str]:
    data = run.cfg.data
    if not isinstance(data, SyntheticDataConfig):
        raise ConfigError(f"calibration draws its prompts from the synthetic set's "
                          f"training split; this run trained on {type(data).__name__}")
    train = SyntheticVideos(count, data.frames, data.height, data.width, data.fps, data.seed)
    return [train.spec(i).caption for i in range(count)]


def calibration_batches(run: TrainedRun, prompts: list[str], seed: int, batch: int
                        ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """((context, mask, null_context, null_mask), noise on the model's device) per chunk of
    ``batch`` prompts; the chunk starting at prompt i draws its noise from seed + i."""
    device = next(run.model.parameters()).device
    for first in range(0, len(prompts), batch):
        chunk = prompts[first: first + batch]
        texts = (*run.model.text(chunk), *run.model.text([""] * len(chunk)))
        generator = torch.Generator().manual_seed(seed + first)
        noise = torch.randn((len(chunk), *run.task.latent_shape), generator=generator)
        yield texts, noise.to(device)


@torch.no_grad()
def calibrate(run: TrainedRun, steps: int, scale: float, prompts: list[str], seed: int,
              batch: int) -> dict:
    """CFG on ``prompts``, watched: -> the calibration record (coefficients per step)."""
    fit = LinearGuidanceFit(steps, alternate_steps(steps))
    for texts, noise in calibration_batches(run, prompts, seed, batch):
        velocity = GuidedVelocity(run.model.dit, *texts, scale, "cfg", observer=fit.observe)
        euler_sample(velocity, noise, linear_quadratic_schedule(steps))
    coefficients, error = fit.coefficients()
    return {"format": FORMAT, "steps": steps, "scale": scale,
            "model_hash": model_hash(run.model), "run": str(run.run_dir), "step": run.step,
            "prompts": len(prompts), "seed": seed,
            "coefficients": [None if row.isnan().any() else row.tolist()
                             for row in coefficients],
            "relative_error": [None if e != e else e for e in error.tolist()]}


def read_calibration(path: Path, model: nn.Module, kind: str, fitted_for: dict,
                     needed_by: str, redo: str) -> dict:
    """The JSON record of a calibration file of format ``kind`` made for ``model``'s
    weights and the settings ``fitted_for`` (e.g. steps and scale); a missing, corrupt,
    mismatched or stale (other weights) file is refused, naming it. ``needed_by`` is the
    option that asked for it, ``redo`` how to make the file again."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{needed_by} needs the calibration file {path}, which is "
                          f"missing; {redo}")
    try:
        record = json.loads(path.read_text())
        fitted = (record["format"], {key: record[key] for key in fitted_for},
                  str(record["model_hash"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"calibration file {path} is corrupt ({error!r}); delete it and "
                          f"{redo}") from error
    if fitted[0] != kind:
        raise ConfigError(f"calibration file {path} is corrupt: format {fitted[0]!r}, not "
                          f"{kind!r}; delete it and {redo}")
    if fitted[1] != fitted_for:
        raise ConfigError(f"calibration file {path} was fitted for "
                          f"{' '.join(f'{k}={v:g}' for k, v in fitted[1].items())}, not "
                          f"{' '.join(f'{k}={v:g}' for k, v in fitted_for.items())}; {redo}")
    current = model_hash(model)
    if fitted[2] != current:
        raise ConfigError(f"calibration file {path} is stale: fitted on weights "
                          f"{fitted[2][:12]}, these are {current[:12]} (another checkpoint "
                          f"or ema setting); {redo}")
    return record


def load_coefficients(path: Path, model: nn.Module, steps: int, scale: float) -> torch.Tensor:
    """The (steps, 3) LinearAG rows of a calibration file for this model, steps and
    scale (NaN rows: steps run for real); anything else is refused, naming the file."""
    redo = (f"calibrate it: python -m trainer.linear_guidance checkpoint=<run dir> "
            f"steps={steps} scale={scale:g}")
    record = read_calibration(path, model, FORMAT, {"steps": steps, "scale": scale},
                              "guidance=linear_ag", redo)
    try:
        coefficients = torch.tensor(
            [[float("nan")] * 3 if row is None else [float(v) for v in row]
             for row in record["coefficients"]], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"LinearAG calibration file {path} is corrupt ({error!r}); delete "
                          f"it and {redo}") from error
    if coefficients.shape != (steps, 3):
        raise ConfigError(f"LinearAG calibration file {path} is corrupt (coefficients "
                          f"{tuple(coefficients.shape)} for {steps} steps); delete it and "
                          f"{redo}")
    return coefficients


def main(argv: list[str]) -> None:
    try:
        opts = parse_cli_options(CalibrationRun, argv, "trainer.linear_guidance",
                                 "checkpoint=<run dir> [steps=25 scale=5 prompts=32 ...]")
        run = load_text_to_video(Path(opts.checkpoint), torch.device(opts.device), opts.ema)
        record = calibrate(run, opts.steps, opts.scale, calibration_prompts(run, opts.prompts),
                           opts.seed, opts.batch)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    path = Path(opts.output) if opts.output else calibration_path(run.run_dir, opts.steps,
                                                                 opts.scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    errors = [e for e in record["relative_error"] if e is not None]
    print(f"{path}: {len(errors)} of {opts.steps} unconditional passes predicted, relative "
          f"squared error {min(errors):.2e} to {max(errors):.2e} on the calibration runs")


if __name__ == "__main__":
    main(sys.argv[1:])
