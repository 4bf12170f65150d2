"""``trainer.init_from``: start a fresh run (new optimizer, step 0) from another run's
weights, at any mesh: a fine-tuning stage from a pre-training stage, 768 px from 256 px.

The source is a run directory (its newest intact checkpoint; with early stopping the best
one, named in its best.json), one of its ``checkpoints/step_N`` (written at any mesh) or
a safetensors file (``trainer.export``, ``trainer.average``); ``trainer.init_ema`` picks a
checkpoint's EMA or training weights.
Every rank reads full tensors one at a time and keeps its shards. Position tables may
grow (more T/H/W patches): the trained rows are kept and the new rows take the new
model's own initial values; any other shape difference stops the run at start, as does
a tensor missing on either side unless ``trainer.init_allow_missing`` lists it. The EMA
is built after this, so it starts from the loaded weights. A run that already has a
checkpoint of its own resumes from it and ignores ``init_from``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from parallel.mesh import ParallelContext
from parallel.weights import (
    CheckpointWeights,
    SafetensorsWeights,
    load_weights,
    open_weights,
    plan_load,
)
from trainer.build import build_model
from trainer.config import ConfigError, TrainConfig
from trainer.trained import locate_checkpoint

KEY = "trainer.init_from"


def open_source(path: Path, ema: bool) -> CheckpointWeights | SafetensorsWeights:
    """A reader for ``trainer.init_from``; a bad path is a config error naming it."""
    if not path.exists():
        raise ConfigError(f"{KEY}={path} does not exist; give a run directory, one of its "
                          f"checkpoints/step_N or a .safetensors file")
    try:
        if path.is_dir():
            path = locate_checkpoint(path, KEY)[1]
        return open_weights(path, ema)
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith(KEY) else f"{KEY}={path}: {message}"
                          ) from None


def frozen_copy(cfg: TrainConfig, ctx: ParallelContext, role: str) -> nn.Module:
    """``trainer.init_from``'s weights in a model built and sharded like the trained one,
    in eval mode with no gradients: DPO's reference, a distilled student's teacher."""
    copy = build_model(cfg, ctx)
    initialise_from(cfg, copy, None, is_main=False)
    if ctx.is_main:
        print(f"{role}: a frozen copy of {KEY}={cfg.trainer.init_from}", flush=True)
    return copy.eval().requires_grad_(False)


def initialise_from(cfg: TrainConfig, model: nn.Module, resume_from: Path | None,
                    is_main: bool) -> None:
    """Load ``trainer.init_from`` into the freshly built (possibly sharded) model, unless
    the run resumes from ``resume_from``, its own checkpoint."""
    opts = cfg.trainer
    if not opts.init_from:
        return
    if resume_from is not None:
        if is_main:
            print(f"{KEY}={opts.init_from} ignored: the run has a checkpoint of its own and "
                  f"resumes from it ({resume_from})", flush=True)
        return
    source = open_source(Path(opts.init_from), opts.init_ema)
    plan = plan_load(model, source.specs, opts.init_allow_missing)
    if problems := plan.problems(str(source.path)):
        fixes = []
        if plan.mismatched:
            fixes.append("only position tables grow (larger model.max_patches_t/h/w); set "
                         "the other sizes back to the source run's")
        if plan.missing or plan.unexpected:
            fixes.append("list the tensors to skip (a missing one keeps its fresh init) in "
                         "trainer.init_allow_missing, fnmatch patterns, e.g. "
                         "trainer.init_allow_missing=[dit.final.*]")
        raise ConfigError(f"{KEY}={opts.init_from} does not fit this model: "
                          f"{'; '.join(problems)}. Fix: {'; '.join(fixes)}")
    load_weights(model, source.read, plan, opts.seed)
    if is_main:
        which = (source.metadata.get("weights", "stored") if isinstance(source, SafetensorsWeights)
                 else "EMA" if opts.init_ema else "training")
        notes = [f"{len(plan.copy)} tensors copied"]
        notes += [f"{name} grown {tuple(old)} -> {tuple(new)}"
                  for name, (old, new) in plan.grow.items()]
        if plan.allowed:
            more = f" and {len(plan.allowed) - 5} more" if len(plan.allowed) > 5 else ""
            notes.append(f"{len(plan.allowed)} allowed by trainer.init_allow_missing skipped "
                         f"(a missing one keeps its fresh init): "
                         f"{', '.join(plan.allowed[:5])}{more}")
        print(f"initialised from {source.path} ({which} weights): {'; '.join(notes)}",
              flush=True)
