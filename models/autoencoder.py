"""The autoencoder seam between pixels and the DiT's latent space.

Every autoencoder maps video (B, 3, T, H, W) in [-1, 1] to a latent (B, C, T', H', W') and
back, and states its compression so configs can be checked before anything runs:
``latent_channels``, ``temporal_compression``, ``spatial_compression`` and
``latent_shape(frames, height, width)``. The identity autoencoder lets the DiT train on
pixels (optionally folded space-to-depth) before the TAE exists.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class IdentityAutoencoder(nn.Module):
    """Pixels as latents, folded s x s space-to-depth: (B, 3, T, H, W) -> (B, 3s², T, H/s, W/s)."""

    temporal_compression = 1
    trainable = False

    def __init__(self, space_to_depth: int = 1, channels: int = 3):
        super().__init__()
        if space_to_depth < 1:
            raise ValueError(f"autoencoder.space_to_depth={space_to_depth} must be >= 1")
        self.space_to_depth = space_to_depth
        self.channels = channels

    @property
    def latent_channels(self) -> int:
        return self.channels * self.space_to_depth ** 2

    @property
    def spatial_compression(self) -> int:
        return self.space_to_depth

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.space_to_depth
        if height % s or width % s:
            raise ValueError(f"video size {height}x{width} is not divisible by "
                             f"autoencoder.space_to_depth={s}")
        return self.latent_channels, frames, height // s, width // s

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        s = self.space_to_depth
        return rearrange(video, "b c t (h s1) (w s2) -> b (c s1 s2) t h w", s1=s, s2=s)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        s = self.space_to_depth
        return rearrange(latent, "b (c s1 s2) t h w -> b c t (h s1) (w s2)", s1=s, s2=s)
