"""The module a TAE run trains: the autoencoder and its optional patch discriminator under
one root, so one engine, optimizer, EMA and checkpoint hold both.

``forward(video (B, 3, T, H, W), noise (B, C, T', H', W'))`` -> (reconstruction
(B, 3, T, H, W), posterior mean, logvar (B, C, T', H', W')). The noise is passed in so a
data-parallel run can draw it for the global batch and slice its rows.
"""

from __future__ import annotations

import torch
from torch import nn

from models.init import init_parameters
from models.tae import TemporalAutoencoder
from models.tae_losses import PatchDiscriminator


class AutoencoderTraining(nn.Module):
    def __init__(self, autoencoder: TemporalAutoencoder,
                 discriminator: PatchDiscriminator | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.discriminator = discriminator

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from (seed, parameter name); works after ``to_empty``."""
        init_parameters(self, seed)

    def forward(self, video: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.autoencoder(video, noise=noise)
