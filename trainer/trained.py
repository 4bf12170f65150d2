"""Load a trained run's weights into one process, whatever mesh or engine trained it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from parallel.checkpoint import Checkpointer, load_deepspeed_weights, load_training_state
from trainer.build import single_process
from trainer.config import TrainConfig
from trainer.ema import EMA
from trainer.run_config import load_run_config
from trainer.t2v_task import TextToVideoTask
from trainer.tasks import build_task


@dataclass
class TrainedRun:
    cfg: TrainConfig
    run_dir: Path
    step: int
    task: object      # the run's task, built for one process
    model: nn.Module  # the trained module, in eval mode


def locate_checkpoint(checkpoint: Path) -> tuple[Path, Path]:
    """(run dir, intact checkpoint dir) from a run dir or one of its ``checkpoints/step_N``."""
    if checkpoint.name.startswith("step_") and checkpoint.parent.name == "checkpoints":
        problem = Checkpointer.verify(checkpoint)
        if problem:
            raise ValueError(f"checkpoint={checkpoint} is damaged: {problem}")
        return checkpoint.parent.parent, checkpoint
    found = Checkpointer(checkpoint / "checkpoints", keep_last=0).latest()
    if found is None:
        raise FileNotFoundError(f"checkpoint={checkpoint} has no intact checkpoint under "
                                f"{checkpoint / 'checkpoints'}")
    return checkpoint, found


def load_run(checkpoint: Path, device: torch.device, ema: bool = True,
             frames: int | None = None, height: int | None = None,
             width: int | None = None) -> TrainedRun:
    """Rebuild a run's model from its saved config and load its weights (EMA by default).

    frames/height/width (synthetic data only) change the shape the task is set up for,
    e.g. to sample longer videos than the run trained on.
    """
    run_dir, step_dir = locate_checkpoint(Path(checkpoint))
    cfg = load_run_config(run_dir)
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if value is not None:
            setattr(cfg.data, name, value)
    task = build_task(cfg, single_process(device))
    model = task.build_model()
    averaged = EMA({n: p for n, p in model.named_parameters() if p.requires_grad},
                   cfg.recipe.ema_decay)
    if (step_dir / "deepspeed").is_dir():
        state = load_deepspeed_weights(step_dir, model, averaged.state_dict())
    else:
        state = load_training_state(step_dir, model, None, averaged.state_dict())
    if ema:
        averaged.swap()
    return TrainedRun(cfg, run_dir, state["step"], task, model.eval())


def load_text_to_video(checkpoint: Path, device: torch.device, ema: bool = True,
                       **shape: int | None) -> TrainedRun:
    """``load_run`` for sampling: the run must have trained a text-to-video model."""
    run = load_run(checkpoint, device, ema, **shape)
    if not isinstance(run.task, TextToVideoTask):
        raise ValueError(f"checkpoint={checkpoint} is a task={run.cfg.task.value} run; "
                         f"sampling needs a text-to-video (task=t2v) run")
    return run
