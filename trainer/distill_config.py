"""``task=distill`` with ``recipe=distill``: a few-step student distilled from a trained
text-to-video teacher by Imagine Flash's backward distillation (arXiv 2405.05224; math
in models/distill.py, task in trainer/distill_task.py).

The student's schedule is part of its recipe, so it travels with every checkpoint and
exported file (both carry the run's config): ``trainer.sample`` samples a student on the
times it was trained on, conditional only (the teacher's guidance is distilled into it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch

from models.distill import check_times, default_times
from trainer.config import ConfigError, RecipeConfig, Task, TrainConfig, check_frozen_copy


class DistillTarget(Enum):
    """What the student's clean estimate is pulled toward (models/distill.py)."""

    shifted_reconstruction = "shifted_reconstruction"
    teacher_trajectory = "teacher_trajectory"


@dataclass
class DistillRecipeConfig(RecipeConfig):
    """``steps``: the student's sampling steps (the paper's 1, 2 or 3; any >= 1 works).
    ``times``: its steps + 1 Euler times from 0 (noise) to 1 (data); [] is the teacher
    sampler's linear-quadratic schedule at ``steps`` (0, 1 for one step). ``shift``: the
    shifted reconstruction loss re-noises the student's clean estimate at step time t to
    noise level shift * (1 - t) before the teacher refines it. ``teacher_guidance``: the
    classifier-free guidance scale of the teacher's target (the scale the student then
    reproduces without an unconditional pass). ``target``: ``shifted_reconstruction`` (the
    paper's) or ``teacher_trajectory`` (the teacher's own ``teacher_steps``-step sample from
    the student's state; models/distill.py)."""

    steps: int = 3
    times: list[float] = field(default_factory=list)
    shift: float = 0.75
    teacher_guidance: float = 5.0
    target: DistillTarget = DistillTarget.shifted_reconstruction
    teacher_steps: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.times = [float(t) for t in self.times]  # Hydra passes a ListConfig
        if self.steps < 1:
            raise ConfigError(f"recipe.steps={self.steps} must be >= 1 (the student's "
                              f"sampling steps; Imagine Flash uses 1 to 3)")
        if self.times:
            if len(self.times) != self.steps + 1:
                raise ConfigError(f"recipe.times={self.times} must hold recipe.steps + 1 = "
                                  f"{self.steps + 1} times from 0 to 1, or [] for the "
                                  f"linear-quadratic schedule")
            try:
                check_times(torch.tensor(self.times, dtype=torch.float64))
            except ValueError as error:
                raise ConfigError(f"recipe.times: {error}") from None
        if self.teacher_steps < 1:
            raise ConfigError(f"recipe.teacher_steps={self.teacher_steps} must be >= 1 (the "
                              f"teacher's Euler steps of recipe.target=teacher_trajectory)")
        if not 0 < self.shift <= 1:
            raise ConfigError(f"recipe.shift={self.shift} must lie in (0, 1]: the fraction of "
                              f"the step's noise level the teacher's input gets")
        if not 1 <= self.teacher_guidance < math.inf:
            raise ConfigError(f"recipe.teacher_guidance={self.teacher_guidance} must be a "
                              f"finite number >= 1 (1: the teacher's conditional velocity)")
        if self.pixel_loss.weight or self.noise_offset:
            raise ConfigError(f"recipe.pixel_loss.weight={self.pixel_loss.weight} and "
                              f"recipe.noise_offset={self.noise_offset} shape the flow-matching "
                              f"loss, which task=distill does not train; set both to 0")
        if self.caption_dropout:
            raise ConfigError(f"recipe.caption_dropout={self.caption_dropout}: a distilled "
                              f"student samples conditional only, so it never needs the empty "
                              f"caption; set it to 0")

    def student_times(self) -> torch.Tensor:
        """(steps + 1,) float64: the times the student trains and samples on."""
        if self.times:
            return torch.tensor(self.times, dtype=torch.float64)
        return default_times(self.steps)


def check_distill(cfg: TrainConfig) -> None:
    """task=distill and recipe=distill come together; the teacher is the init_from run,
    sharded like the student by FSDP2."""
    task, recipe = cfg.task is Task.distill, isinstance(cfg.recipe, DistillRecipeConfig)
    if recipe and not task:
        raise ConfigError(f"recipe=distill trains a few-step student, but task="
                          f"{cfg.task.value}; set task=distill")
    if task and not recipe:
        raise ConfigError("task=distill needs the student's steps, shift and teacher guidance: "
                          "use recipe=distill")
    check_frozen_copy(cfg, "task=distill (the teacher)")


def student_sampling(cfg: TrainConfig, steps: int) -> torch.Tensor | None:
    """The Euler times a run's model samples with at ``steps`` steps: a distilled
    student's trained times (a different ``steps`` is refused), None for any other run
    (the linear-quadratic schedule applies)."""
    if not isinstance(cfg.recipe, DistillRecipeConfig):
        return None
    times = cfg.recipe.student_times()
    if steps != cfg.recipe.steps:
        raise ConfigError(f"steps={steps}, but this is a student distilled for "
                          f"{cfg.recipe.steps} steps at times {times.tolist()}; pass "
                          f"steps={cfg.recipe.steps}")
    return times
