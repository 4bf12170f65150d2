"""``python -m trainer.export checkpoint=<run dir> output=model.safetensors [ema=true]``

Consolidates a run's newest intact checkpoint (an early-stopped run's best, see
``trainer.early_stop``; or a given ``.../checkpoints/step_N``),
whatever mesh wrote its shards, into one safetensors file of full weights: EMA weights by
default (the ones sampled), the training weights with ``ema=false``. The file's metadata
names the run, the step and which weights these are, and carries the run's config, so
``trainer.sample checkpoint=<file>`` and ``trainer.average`` can use the file alone; a
file is also a valid ``trainer.init_from``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from parallel.weights import write_safetensors
from trainer.config import ConfigError
from trainer.run_config import parse_cli_options
from trainer.trained import load_run


@dataclass
class ExportConfig:
    checkpoint: str = MISSING   # a run dir, one of its checkpoints/step_N, or a safetensors
    #                             file carrying its run's config
    output: str = MISSING       # the .safetensors file to write
    ema: bool = True


def export(opts: ExportConfig) -> Path:
    """Write the file whole or not at all (``write_safetensors``: a temporary file beside
    it, fsynced, renamed into place): an interrupted export leaves any earlier file."""
    run = load_run(Path(opts.checkpoint), torch.device("cpu"), opts.ema)
    tensors = {name: value.detach() for name, value in run.model.state_dict().items()}
    return write_safetensors(
        Path(opts.output), {name: (t.shape, t.dtype) for name, t in tensors.items()},
        tensors.__getitem__, metadata={"run_dir": str(run.run_dir), "step": str(run.step),
                                       "weights": "ema" if opts.ema else "train",
                                       **run.metadata})


def main(argv: list[str]) -> None:
    opts = parse_cli_options(ExportConfig, argv, "trainer.export",
                             "checkpoint=<run dir> output=<file.safetensors> [ema=true]")
    try:
        path = export(opts)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
