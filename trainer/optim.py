"""AdamW with linear warmup then cosine decay (or constant), stepped once per train step."""

from __future__ import annotations

import math

import torch

from trainer.config import LRSchedule, RecipeConfig


def lr_factor(step: int, warmup: int, max_steps: int, schedule: LRSchedule,
              min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule is LRSchedule.constant:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, recipe: RecipeConfig, max_steps: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas),
                                  eps=recipe.eps, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, recipe.warmup_steps, max_steps,
                                          recipe.schedule, recipe.min_lr_ratio))
    return optimizer, scheduler
