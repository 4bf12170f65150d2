"""AdamW with linear warmup then cosine decay, constant, or constant cut on validation
plateaus; the schedule is stepped once per train step."""

from __future__ import annotations

import math

import torch

from trainer.config import LRSchedule, PlateauConfig, RecipeConfig
from trainer.early_stop import Improvement


def lr_factor(step: int, warmup: int, max_steps: int, schedule: LRSchedule,
              min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based), before any plateau cut."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule is not LRSchedule.cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PlateauCut:
    """The plateau schedule's state: ``scale`` multiplies the LR; it is multiplied by
    ``factor`` when the watched validation value has not improved for ``patience``
    validations in a row, and never goes below ``min_scale`` (min_lr / lr)."""

    def __init__(self, cfg: PlateauConfig, lr: float):
        self.patience, self.factor = cfg.patience, cfg.factor
        self.min_scale = cfg.min_lr / lr
        self.watch = Improvement(cfg.threshold)
        self.scale = 1.0

    def observe(self, value: float) -> bool:
        """One validation's value; True when it cut the LR."""
        if self.watch.update(value) or self.watch.bad < self.patience:
            return False
        self.watch.bad = 0  # the next cut needs another `patience` bad validations
        scale = max(self.scale * self.factor, self.min_scale)
        cut, self.scale = scale < self.scale, scale
        return cut

    def state_dict(self) -> dict:
        return {"scale": self.scale, **self.watch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self.watch.load_state_dict(state)


class Scheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR times the plateau scale (if any). ``observe`` feeds it a validation value;
    a cut applies from the next step on. Its state is saved with the scheduler's, so a
    resumed run cuts at the same validations."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: RecipeConfig, max_steps: int):
        self.recipe = recipe
        self.plateau = (PlateauCut(recipe.plateau, recipe.lr)
                        if recipe.schedule is LRSchedule.plateau else None)
        plateau = self.plateau
        super().__init__(optimizer, lambda step: lr_factor(
            step, recipe.warmup_steps, max_steps, recipe.schedule, recipe.min_lr_ratio)
            * (plateau.scale if plateau else 1.0))

    def observe(self, value: float) -> bool:
        """A validation's value (the same on every rank); True when the LR was cut. The
        LR of the step about to run (``last_epoch``) is rewritten at once."""
        if self.plateau is None or not self.plateau.observe(value):
            return False
        self._rewrite_lr()
        return True

    def _rewrite_lr(self) -> None:
        """The LR of the step about to run, from the base LR and the schedule now."""
        self._last_lr = [base * fn(self.last_epoch)
                         for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def state_dict(self) -> dict:
        # the recipe is this run's config, not state (and no plain data a checkpoint loads)
        state = {k: v for k, v in super().state_dict().items()
                 if k not in ("plateau", "recipe")}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """The schedule's position (and plateau cuts) from a checkpoint; the optimizer's
        state must be loaded first. The LR, betas, eps and weight decay are this run's
        recipe: the saved state carries the base LR it was built with, and a run resumed
        with a lowered ``recipe.lr`` would otherwise keep training at the old one."""
        state = dict(state)
        plateau = state.pop("plateau", None)
        super().load_state_dict(state)
        if self.plateau is not None and plateau is not None:
            self.plateau.load_state_dict(plateau)
        # a checkpoint without plateau state (another schedule before) starts at scale 1
        recipe = self.recipe
        for group in self.optimizer.param_groups:
            group.update(initial_lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                         weight_decay=recipe.weight_decay)
        self.base_lrs = [recipe.lr] * len(self.optimizer.param_groups)
        self._rewrite_lr()


def build_optimizer(params, recipe: RecipeConfig, max_steps: int, fused: bool = False
                    ) -> tuple[torch.optim.AdamW, Scheduler]:
    """``fused``: torch's fused AdamW kernel, which can skip a step on a device-side flag
    (``found_inf``) without the host reading it; the native engine steps it that way."""
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas),
                                  eps=recipe.eps, weight_decay=recipe.weight_decay,
                                  fused=fused)
    return optimizer, Scheduler(optimizer, recipe, max_steps)
