"""``python -m trainer.average checkpoints=[runs/a,runs/b] [weights=[1,2]] output=avg.safetensors
[ema=true]``

The uniform or weighted mean of several runs' weights (a "model soup" of fine-tuned runs,
arXiv:2203.05482), written as one safetensors file. Each entry of ``checkpoints`` is a run
directory (its newest intact checkpoint, or an early-stopped run's best), one of its
``checkpoints/step_N`` (written at any mesh) or a safetensors file (which holds one set
of weights; ``ema`` picks between a checkpoint's EMA, the default, and training weights).
DeepSpeed checkpoints are refused with the command that consolidates them into a file
first.

Streamed: every checkpoint is opened (names, shapes and dtypes only), checked to hold the
same tensors, then for each tensor that tensor is read from each checkpoint in turn and
accumulated in fp32 (the sum of weight × tensor, divided by the sum of the weights, so
two copies of one checkpoint average to it bit for bit), cast back to the first
checkpoint's dtype and written, so memory holds two tensors, never a model. The file
appears complete or not at all (temporary file, then rename). Its metadata names the
sources, the weights and which weights were averaged, and carries the first source's run
config, so ``trainer.sample``, ``trainer.export`` and ``trainer.init_from`` take the file.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

from parallel.weights import CheckpointWeights, SafetensorsWeights, open_weights, write_safetensors
from trainer.config import ConfigError
from trainer.run_config import (
    CONFIG_KEY,
    OVERRIDES_KEY,
    checkpoint_config,
    parse_cli_options,
    run_config_metadata,
)
from trainer.trained import locate_checkpoint

USAGE = "checkpoints=[<run dir>,<run dir>,...] output=<file.safetensors> [weights=[...]] [ema=true]"


@dataclass
class AverageConfig:
    checkpoints: Any = MISSING  # two or more run dirs, checkpoints/step_N or .safetensors
    output: str = MISSING       # the .safetensors file to write
    weights: Any = None         # one number per checkpoint (default: all equal)
    ema: bool = True


Source = CheckpointWeights | SafetensorsWeights


def check_inputs(checkpoints: Any, weights: Any) -> tuple[list[Path], list[float]]:
    """The checkpoint paths and one finite weight each, not summing to 0."""
    if isinstance(checkpoints, str) or len(checkpoints) < 2:
        named = checkpoints if isinstance(checkpoints, str) else list(checkpoints)
        raise ConfigError(f"checkpoints={named} names one checkpoint; averaging needs two or "
                          f"more: checkpoints=[runs/a,runs/b] (python -m trainer.export "
                          f"converts a single one)")
    paths = [Path(str(path)) for path in checkpoints]
    if weights is None:
        return paths, [1.0] * len(paths)
    if isinstance(weights, (str, int, float)) or len(weights) != len(paths):
        raise ConfigError(f"weights={weights} must be a list of one number per checkpoint "
                          f"({len(paths)}), e.g. weights=[{','.join(['1'] * len(paths))}]")
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"weights={weights} must be numbers") from None
    if not all(math.isfinite(w) for w in values) or sum(values) == 0:
        raise ConfigError(f"weights={weights} must be finite and must not sum to 0 (the mean "
                          f"divides by their sum)")
    return paths, values


def open_source(index: int, path: Path, ema: bool) -> tuple[Source, dict[str, str]]:
    """A reader for ``checkpoints[index]`` and the run config it carries (maybe none)."""
    key = f"checkpoints[{index}]"
    try:
        if path.is_file():
            source = open_weights(path, ema)
            config = {k: source.metadata[k] for k in (OVERRIDES_KEY, CONFIG_KEY)
                      if k in source.metadata}
            return source, config
        run_dir, step_dir = locate_checkpoint(path, key)
        config = checkpoint_config(step_dir)
        if config is None and (run_dir / ".hydra" / "config.yaml").is_file():
            config = run_config_metadata(run_dir)  # a checkpoint older than stored configs
        return open_weights(step_dir, ema), config or {}
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith(key) else f"{key}={path}: {message}"
                          ) from None


def check_same_tensors(sources: list[Source]) -> None:
    """Every checkpoint holds the first one's tensor names and shapes."""
    first = sources[0]
    for index, other in enumerate(sources[1:], 1):
        where = f"checkpoints[0]={first.path} and checkpoints[{index}]={other.path}"
        for names, side in ((sorted(first.specs.keys() - other.specs.keys()), "the first"),
                            (sorted(other.specs.keys() - first.specs.keys()), "the second")):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                raise ConfigError(f"{where} hold different tensors: {len(names)} only in "
                                  f"{side}: {', '.join(names[:5])}{more}")
        for name, (shape, _) in first.specs.items():
            if other.specs[name][0] != shape:
                raise ConfigError(f"{where} do not match: {name} has shape {tuple(shape)} in "
                                  f"the first but {tuple(other.specs[name][0])} in the second")


def mean_tensor(name: str, sources: list[Source], weights: list[float]) -> torch.Tensor:
    """sum(w_i x_i) / sum(w_i) in fp32, in the first checkpoint's dtype; a non-float tensor
    (an index, a step counter) must be equal everywhere and is copied."""
    dtype = sources[0].specs[name][1]
    if not dtype.is_floating_point:
        value = sources[0].read(name)
        for source in sources[1:]:
            if not torch.equal(source.read(name), value):
                raise ConfigError(f"{name} ({dtype}) cannot be averaged and differs between "
                                  f"{sources[0].path} and {source.path}")
        return value
    total = torch.zeros(sources[0].specs[name][0], dtype=torch.float32)
    for weight, source in zip(weights, sources, strict=True):
        total.add_(source.read(name).float(), alpha=weight)
    return total.div_(sum(weights)).to(dtype)


def average(opts: AverageConfig) -> Path:
    paths, weights = check_inputs(opts.checkpoints, opts.weights)
    opened = [open_source(index, path, opts.ema) for index, path in enumerate(paths)]
    sources = [source for source, _ in opened]
    check_same_tensors(sources)
    config = opened[0][1]
    if not config:
        print(f"note: {sources[0].path} carries no run config, so trainer.sample cannot read "
              f"the average alone (trainer.init_from can)", flush=True)
    metadata = {"weights": "ema" if opts.ema else "train",
                "sources": json.dumps([str(source.path) for source in sources]),
                "average_weights": json.dumps(weights), **config}
    return write_safetensors(Path(opts.output), sources[0].specs,
                             lambda name: mean_tensor(name, sources, weights), metadata)


def main(argv: list[str]) -> None:
    opts = parse_cli_options(AverageConfig, argv, "trainer.average", USAGE)
    try:
        path = average(opts)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
