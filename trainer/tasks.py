"""The task a run trains, chosen by ``task``: what the model is, its loss, validation and
what it shows. The loop in ``trainer.train`` is the same for all of them. A text-to-video
run on preference pairs (``recipe=preference``, ``data=preference*``) is the preference
task: the same model, a different loss; ``task=distill`` (``recipe=distill``) trains a
few-step student of a trained teacher."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from data.preference_shards import is_preference
from parallel.mesh import ParallelContext
from trainer.config import Task, TrainConfig
from trainer.distill_config import DistillRecipeConfig
from trainer.distill_task import DistillTask
from trainer.draws import StepDraws
from trainer.metrics import Monitor
from trainer.preference_config import PreferenceRecipeConfig
from trainer.preference_task import PreferenceTask
from trainer.t2v_task import TextToVideoTask
from trainer.tae_task import AutoencoderTask


class TrainingTask(Protocol):
    """What ``trainer.train``'s loop asks of a task."""

    def build_model(self) -> nn.Module:
        """The model, parallelised over the task's mesh and materialised."""

    def describe(self) -> str:
        """One line for the start-of-run log: sizes and tokens per sample."""

    def loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws, rows: slice,
             global_batch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's ``rows`` of the global batch -> (scalar loss, extra metrics)."""

    def tokens(self, batch: dict[str, Any]) -> int:
        """Tokens the model sees for this rank's batch (throughput logging)."""

    def validate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Validation metrics over ``batches``, equal on every rank."""

    def show(self, step: int, run_dir: Path, model: nn.Module, monitor: Monitor) -> None:
        """Write (and log) what a person looks at: samples, reconstructions."""


def build_task(cfg: TrainConfig, ctx: ParallelContext) -> TrainingTask:
    if cfg.task is Task.tae:
        return AutoencoderTask(cfg, ctx)
    if cfg.task is Task.distill or isinstance(cfg.recipe, DistillRecipeConfig):
        return DistillTask(cfg, ctx)  # it refuses one without the other
    if isinstance(cfg.recipe, PreferenceRecipeConfig) or is_preference(cfg.data):
        return PreferenceTask(cfg, ctx)  # it refuses one without the other
    return TextToVideoTask(cfg, ctx)
