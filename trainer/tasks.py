"""The task a run trains, chosen by ``task``: what the model is, its loss, validation and
what it shows. The loop in ``trainer.train`` is the same for all of them."""

from __future__ import annotations

from parallel.mesh import ParallelContext
from trainer.config import Task, TrainConfig
from trainer.t2v_task import TextToVideoTask
from trainer.tae_task import AutoencoderTask


def build_task(cfg: TrainConfig, ctx: ParallelContext) -> TextToVideoTask | AutoencoderTask:
    if cfg.task is Task.tae:
        return AutoencoderTask(cfg, ctx)
    return TextToVideoTask(cfg, ctx)
