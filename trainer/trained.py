"""Load a trained run's weights into one process, whatever mesh or engine trained it, or
from a safetensors file that carries its run's config (``trainer.export``,
``trainer.average``); or onto a sampling mesh, each rank reading only its shards
(``load_sharded_run``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from parallel.checkpoint import Checkpointer, load_checkpoint_weights
from parallel.mesh import ParallelContext
from parallel.weights import (
    SafetensorsWeights,
    load_local_shards,
    load_weights,
    open_weights,
    plan_load,
)
from trainer.build import build_meta_model, single_process
from trainer.config import TrainConfig
from trainer.early_stop import BEST_FILE, best_checkpoint
from trainer.ema import EMA
from trainer.run_config import (
    CONFIG_KEY,
    OVERRIDES_KEY,
    checkpoint_metadata,
    config_from_metadata,
)
from trainer.t2v_task import TextToVideoTask
from trainer.tasks import build_task


@dataclass
class TrainedRun:
    cfg: TrainConfig
    run_dir: Path
    step: int
    task: object      # the run's task, built for one process
    model: nn.Module  # the trained module, in eval mode
    # what a file of these weights carries: the config that trained them as safetensors
    # metadata strings (``checkpoint_metadata``); loaded from a file, all of its metadata
    metadata: dict[str, str] = field(default_factory=dict)


def locate_checkpoint(checkpoint: Path, key: str = "checkpoint") -> tuple[Path, Path]:
    """(run dir, intact checkpoint dir) from a run dir or one of its ``checkpoints/step_N``;
    ``key`` names the option in errors. A run dir means its newest checkpoint, or with
    early stopping the best one its ``best.json`` names."""
    if checkpoint.name.startswith("step_") and checkpoint.parent.name == "checkpoints":
        problem = Checkpointer.verify(checkpoint)
        if problem:
            raise ValueError(f"{key}={checkpoint} is damaged: {problem}")
        return checkpoint.parent.parent, checkpoint
    best = best_checkpoint(checkpoint)
    if best is not None:
        problem = Checkpointer.verify(best) if best.is_dir() else f"{best} is missing"
        if problem:
            raise ValueError(f"{key}={checkpoint}: the best checkpoint its {BEST_FILE} names "
                             f"is damaged ({problem}); pass one of its checkpoints/step_N")
        return checkpoint, best
    found = Checkpointer(checkpoint / "checkpoints", keep_last=0).latest()
    if found is None:
        raise FileNotFoundError(f"{key}={checkpoint} has no intact checkpoint under "
                                f"{checkpoint / 'checkpoints'}")
    return checkpoint, found


def load_run(checkpoint: Path, device: torch.device, ema: bool = True,
             frames: int | None = None, height: int | None = None,
             width: int | None = None) -> TrainedRun:
    """Rebuild a run's model from its saved config and load its weights (EMA by default).

    frames/height/width (synthetic data only) change the shape the task is set up for,
    e.g. to sample longer videos than the run trained on. ``checkpoint`` may also be a
    safetensors file with its run's config in its metadata; it holds one set of weights
    (its metadata's ``weights`` says which), so ``ema`` does not apply to it.
    """
    if Path(checkpoint).is_file():
        return _load_file(Path(checkpoint), device, frames, height, width)
    run_dir, step_dir = locate_checkpoint(Path(checkpoint))
    metadata = checkpoint_metadata(run_dir, step_dir)
    cfg = _with_shape(config_from_metadata(metadata), frames, height, width)
    task = build_task(cfg, single_process(device))
    model = task.build_model()
    averaged = EMA({n: p for n, p in model.named_parameters() if p.requires_grad},
                   cfg.recipe.ema_decay)
    state = load_checkpoint_weights(step_dir, model, averaged.state_dict())
    if ema:
        averaged.swap()
    return TrainedRun(cfg, run_dir, state["step"], task, model.eval(), metadata)


def _with_shape(cfg: TrainConfig, frames, height, width) -> TrainConfig:
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if value is not None:
            setattr(cfg.data, name, value)
    return cfg


def _check_file_config(source: SafetensorsWeights) -> None:
    if CONFIG_KEY not in source.metadata or OVERRIDES_KEY not in source.metadata:
        raise ValueError(f"checkpoint={source.path} carries no run config in its metadata "
                         f"(written by an older trainer.export?); pass the run directory, "
                         f"or export it again")


def _load_file(path: Path, device: torch.device, frames, height, width) -> TrainedRun:
    """A safetensors file's weights into the model its metadata's config describes."""
    source = SafetensorsWeights(path)
    _check_file_config(source)
    cfg = _with_shape(config_from_metadata(source.metadata), frames, height, width)
    task = build_task(cfg, single_process(device))
    model = task.build_model()
    plan = plan_load(model, source.specs, grow=False)
    if problems := plan.problems(str(path)):
        raise ValueError(f"checkpoint={path} does not fit the model of the config in its "
                         f"metadata: {'; '.join(problems)}")
    load_weights(model, source.read, plan, cfg.trainer.seed)
    return TrainedRun(cfg, path.parent, int(source.metadata.get("step", 0)), task,
                      model.eval(), source.metadata)


# Shards the meta model of a run's config for this rank's place in the mesh; it may
# refuse the config (a head count the mesh cannot split).
Parallelize = Callable[[TrainConfig, nn.Module], None]


def load_sharded_run(checkpoint: Path, ctx: ParallelContext, parallelize: Parallelize,
                     ema: bool = True, frames: int | None = None, height: int | None = None,
                     width: int | None = None) -> TrainedRun:
    """``load_run`` on a mesh: the run's model is built on meta, sharded by
    ``parallelize``, allocated, and each rank reads only its own shards, from a DCP
    checkpoint of any mesh (EMA weights by default) or a safetensors file. DeepSpeed's
    layout is refused with the way round it (export it to a safetensors file)."""
    path = Path(checkpoint)
    if path.is_file():
        source = SafetensorsWeights(path)
        _check_file_config(source)
        run_dir, metadata = path.parent, source.metadata
        step = int(metadata.get("step", 0))
    else:
        run_dir, step_dir = locate_checkpoint(path)
        source = open_weights(step_dir, ema)
        metadata, step = checkpoint_metadata(run_dir, step_dir), int(step_dir.name[5:])
    cfg = _with_shape(config_from_metadata(metadata), frames, height, width)
    task = build_task(cfg, ctx)
    model = build_meta_model(cfg)
    parallelize(cfg, model)
    model.to_empty(device=ctx.device)
    plan = plan_load(model, source.specs, grow=False)
    if problems := plan.problems(str(path)):
        raise ValueError(f"checkpoint={path} does not fit the model of its run's config: "
                         f"{'; '.join(problems)}")
    load_local_shards(model, source, plan)
    return TrainedRun(cfg, run_dir, step, task, model.eval(), metadata)


def load_text_to_video(checkpoint: Path, device: torch.device, ema: bool = True,
                       ctx: ParallelContext | None = None,
                       parallelize: Parallelize | None = None,
                       **shape: int | None) -> TrainedRun:
    """``load_run`` for sampling (``load_sharded_run`` when ``ctx`` is a mesh, on its
    device): the run must have trained a text-to-video model."""
    if ctx is not None and ctx.distributed:
        run = load_sharded_run(checkpoint, ctx, parallelize, ema, **shape)
    else:
        run = load_run(checkpoint, device, ema, **shape)
    if not isinstance(run.task, TextToVideoTask):
        raise ValueError(f"checkpoint={checkpoint} is a task={run.cfg.task.value} run; "
                         f"sampling needs a text-to-video (task=t2v) run")
    return run
