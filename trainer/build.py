"""Build the run's components from the validated config: model on meta, then materialise.

The parallel layer's place is between the two: modules are sharded while they are still
on the meta device, so no process ever holds more than its shard.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from models.dit import DiT
from models.flow import FlowMatching
from models.t2v import TextToVideo
from models.text import TextConditioner
from parallel.parallelize import parallelize_dit
from trainer.config import TrainConfig


def build_autoencoder(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    autoencoder = instantiate(cfg.autoencoder).to(device)
    autoencoder.requires_grad_(False)
    return autoencoder.eval()


def build_model(cfg: TrainConfig, device: torch.device) -> TextToVideo:
    """Text conditioner + DiT, built on meta, parallelised, then initialised on ``device``.

    Initialisation draws from the global RNG: seed it first for a reproducible model.
    """
    with torch.device("meta"):
        encoders = {name: instantiate(encoder) for name, encoder in cfg.text.encoders.items()}
        model = TextToVideo(DiT(cfg.model), TextConditioner(encoders, cfg.model.width))
    parallelize_dit(model.dit, cfg.parallel.activation_checkpointing.value,
                    cfg.parallel.checkpoint_every, cfg.parallel.compile)
    model.to_empty(device=device)
    model.init_weights()
    return model


def build_flow(cfg: TrainConfig) -> FlowMatching:
    recipe = cfg.recipe
    return FlowMatching(recipe.sigma_min, recipe.t_mean, recipe.t_std)
