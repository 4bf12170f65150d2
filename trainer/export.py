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
from safetensors.torch import save_file

from trainer.run_config import parse_cli_options
from trainer.trained import load_run


@dataclass
class ExportConfig:
    checkpoint: str = MISSING   # a run dir, one of its checkpoints/step_N, or a safetensors
    #                             file carrying its run's config
    output: str = MISSING       # the .safetensors file to write
    ema: bool = True


def export(opts: ExportConfig) -> Path:
    run = load_run(Path(opts.checkpoint), torch.device("cpu"), opts.ema)
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().contiguous() for name, value in
               run.model.state_dict().items()}
    save_file(tensors, str(output), metadata={
        "run_dir": str(run.run_dir), "step": str(run.step),
        "weights": "ema" if opts.ema else "train", **run.metadata})
    return output


def main(argv: list[str]) -> None:
    opts = parse_cli_options(ExportConfig, argv, "trainer.export",
                             "checkpoint=<run dir> output=<file.safetensors> [ema=true]")
    path = export(opts)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
