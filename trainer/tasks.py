"""The task a run trains, chosen by ``task``: what the model is, its loss, validation and
what it shows. The loop in ``trainer.train`` is the same for all of them. A text-to-video
run on preference pairs (``recipe=preference``, ``data=preference*``) is the preference
task: the same model, a different loss."""

from __future__ import annotations

from data.preference_shards import is_preference
from parallel.mesh import ParallelContext
from trainer.config import Task, TrainConfig
from trainer.preference_config import PreferenceRecipeConfig
from trainer.preference_task import PreferenceTask
from trainer.t2v_task import TextToVideoTask
from trainer.tae_task import AutoencoderTask


def build_task(cfg: TrainConfig, ctx: ParallelContext) -> TextToVideoTask | AutoencoderTask:
    if cfg.task is Task.tae:
        return AutoencoderTask(cfg, ctx)
    if isinstance(cfg.recipe, PreferenceRecipeConfig) or is_preference(cfg.data):
        return PreferenceTask(cfg, ctx)  # it refuses one without the other
    return TextToVideoTask(cfg, ctx)
