"""``recipe=preference``: preference tuning of a trained text-to-video model on pairs of a
preferred and a rejected video (math in models/preference.py, task in
trainer/preference_task.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from data.preference_shards import is_preference
from trainer.config import ConfigError, RecipeConfig, TrainConfig, check_frozen_copy


class PreferenceLoss(Enum):
    simpo = "simpo"  # reference-free: reward −β·e (arXiv 2405.14734; 2409.17565)
    dpo = "dpo"      # Diffusion-DPO: reward −β·(e − e_ref), a frozen reference (2311.12908)


class BetaSchedule(Enum):
    constant = "constant"  # β for every t (Flow-DPO, arXiv 2501.13918, found it best)
    eps = "eps"            # β·t²: the loss on the noise error; Flow-DPO's (1 − t)²


@dataclass
class PreferenceRecipeConfig(RecipeConfig):
    """The loss is −log σ(r_w − r_l − ``margin``) with implicit rewards r = −β·e
    (``loss=simpo``) or r = −β·(e − e_ref) (``loss=dpo``), e the per-sample velocity
    error of a side. ``pixel_loss.weight`` is SimPO's μ: μ times the same loss on the
    pixel errors of the frozen decoder (arXiv 2409.17565 uses μ = 8 for a DiT), with
    ``pixel_loss``'s target, window and memory settings. diffusers' Diffusion-DPO script
    writes −log σ(−β/2 ·(...)): its β is twice ours."""

    loss: PreferenceLoss = PreferenceLoss.simpo
    beta: float = 500.0
    margin: float = 0.0
    beta_schedule: BetaSchedule = BetaSchedule.constant

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.beta < math.inf:
            raise ConfigError(f"recipe.beta={self.beta} must be a finite number > 0 (Flow-DPO "
                              f"uses 500 on velocity errors)")
        if not 0 <= self.margin < math.inf:
            raise ConfigError(f"recipe.margin={self.margin} must be a finite number >= 0 "
                              f"(SimPO's γ; 0 for none)")
        if self.loss is PreferenceLoss.dpo and self.margin:
            raise ConfigError(f"recipe.margin={self.margin} is SimPO's target margin; "
                              f"recipe.loss=dpo has none: set recipe.margin=0")
        if self.loss is PreferenceLoss.dpo and self.pixel_loss.weight:
            raise ConfigError(f"recipe.pixel_loss.weight={self.pixel_loss.weight} adds SimPO's "
                              f"pixel-space term; recipe.loss=dpo has none: set it to 0 or use "
                              f"recipe.loss=simpo")


def check_preference(cfg: TrainConfig) -> None:
    """Pairs need the preference recipe and it needs pairs; Diffusion-DPO needs a
    reference (the init_from weights) that FSDP2 shards like the policy."""
    data, recipe = is_preference(cfg.data), isinstance(cfg.recipe, PreferenceRecipeConfig)
    if data and not recipe:
        raise ConfigError("data=preference (or preference_latents) holds preference pairs: "
                          "train them with recipe=preference")
    if recipe and not data:
        raise ConfigError("recipe=preference trains on preference pairs: pick "
                          "data=preference (raw pairs) or data=preference_latents (pairs "
                          "cached by trainer.precompute)")
    if not recipe or cfg.recipe.loss is not PreferenceLoss.dpo:
        return
    check_frozen_copy(cfg, "recipe.loss=dpo (the reference)",
                      alternative=", or recipe.loss=simpo (no reference)")
