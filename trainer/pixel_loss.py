"""``recipe.pixel_loss``: the pixel-space loss (arXiv 2409.17565, math in models/pixel_loss.py)
composed into the text-to-video step.

The task passes ``latent_flow_loss`` a hook that keeps the step's (x0, x1, t, velocity), then
``PixelSpaceLoss.add`` adds weight × the pixel loss of the same draws. The frame window
and crop are drawn per sample from the step's own ``pixel_window`` stream, for this rank's
rows only: a resumed run and every mesh decode the same boxes, the latent loss's draws are
untouched, and with weight 0 nothing is drawn or decoded, so the step is the plain one
bitwise.

On a mesh the decoder is not sharded: every rank holds the frozen decoder whole (it is
outside the FSDP-wrapped model and has no gradients) and decodes its data-parallel rows.
The DiT's output is gathered over cp and replicated over tp, so the tp × cp ranks of a
replica decode the same rows and compute the same loss, as they already do for the
latent loss; the backward through the gather and the tensor-parallel plan then treats
the pixel term like the latent one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from models.flow import FlowMatching
from models.pixel_loss import (
    decoded_pair,
    decoder_blocks,
    draw_windows,
    pixel_space_errors,
    take_windows,
)
from parallel.parallelize import checkpoint_modules
from trainer.config import ConfigError, PixelLossConfig, Precision, TrainConfig
from trainer.draws import StepDraws
from trainer.start_checks import sample_shapes

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


def check_pixel_loss_fits(cfg: TrainConfig, autoencoder: Any) -> None:
    """weight > 0 needs a decoder, and the crop must be whole latent pixels that fit every
    video the data can produce."""
    pixel = cfg.recipe.pixel_loss
    if not callable(getattr(autoencoder, "decode", None)):
        raise ConfigError(f"recipe.pixel_loss.weight={pixel.weight} decodes latents, but the "
                          f"autoencoder {type(autoencoder).__name__} has no decode(); use "
                          f"autoencoder=identity or a tae_* one, or set the weight to 0")
    if not pixel.crop:
        return
    scale = autoencoder.spatial_compression
    if any(n % scale for n in pixel.crop):
        raise ConfigError(f"recipe.pixel_loss.crop={pixel.crop} is not a multiple of the "
                          f"autoencoder's spatial compression {scale}: the crop is taken in "
                          f"latent pixels; round it to a multiple of {scale}")
    for frames, height, width in sample_shapes(cfg.data):
        if pixel.crop[0] > height or pixel.crop[1] > width:
            raise ConfigError(f"recipe.pixel_loss.crop={pixel.crop} (height, width) does not "
                              f"fit data frames/height/width={frames}/{height}/{width}; use a "
                              f"crop no larger than the smallest video")


def build_pixel_loss(cfg: TrainConfig, autoencoder: nn.Module,
                     flow: FlowMatching) -> PixelSpaceLoss | None:
    """The configured pixel-space loss, or None when ``recipe.pixel_loss.weight`` is 0."""
    if not cfg.recipe.pixel_loss.weight:
        return None
    check_pixel_loss_fits(cfg, autoencoder)
    return PixelSpaceLoss(cfg.recipe.pixel_loss, autoencoder, flow)


class PixelSpaceLoss:
    """weight × mean ‖D(a) − D(b)‖² over a window of each sample, D the frozen decoder.

    ``autoencoder`` is used as it is in fp32; with ``dtype=bf16`` a bf16 copy decodes (the
    fp32 one keeps encoding). ``checkpointing`` makes the decoder's blocks recompute their
    activations in backward (on the autoencoder itself: results are unchanged)."""

    def __init__(self, cfg: PixelLossConfig, autoencoder: nn.Module, flow: FlowMatching):
        self.cfg, self.flow = cfg, flow
        self.dtype = DTYPES[cfg.dtype]
        self.scale = autoencoder.spatial_compression
        if self.dtype != torch.float32:
            autoencoder = copy.deepcopy(autoencoder).to(self.dtype)
        self.autoencoder = autoencoder.requires_grad_(False)
        if cfg.checkpointing:
            checkpoint_modules(decoder_blocks(autoencoder))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, T', H', W') -> pixels (B, 3, T, H, W) fp32, in the decoder's dtype
        whatever the step's autocast (the dtype is the decoder's setting, not the DiT's)."""
        with torch.autocast(latent.device.type, enabled=False):
            return self.autoencoder.decode(latent.to(self.dtype)).float()

    def window(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """The decoded box (T', H', W') for a latent of ``size``: at most ``frames`` frames
        (a shorter clip is decoded whole) and the crop in latent pixels."""
        frames, height, width = size
        if self.cfg.frames:
            frames = min(frames, self.cfg.frames)
        if self.cfg.crop:
            height, width = (n // self.scale for n in self.cfg.crop)
        return frames, height, width

    def draw_starts(self, draws: StepDraws, rows: slice,
                    size: tuple[int, int, int]) -> torch.Tensor:
        """(rows, 3) starts of the decoded window of each sample of ``rows`` in a latent of
        ``size`` (T', H', W')."""
        window = self.window(size)
        return draws.per_sample("pixel_window", rows, lambda g: draw_windows(g, 1, size, window))

    def errors(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
               velocity: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """(B,) unweighted pixel error of each sample's window at ``starts`` (B, 3)."""
        window = self.window(tuple(x1.shape[2:]))
        x0, x1, velocity = (take_windows(x, starts, window) for x in (x0, x1, velocity))
        reference, prediction = decoded_pair(self.flow, x0, x1, t, velocity,
                                             self.cfg.target.value)
        return pixel_space_errors(self.decode, reference, prediction)

    def __call__(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                 velocity: torch.Tensor, draws: StepDraws, rows: slice) -> torch.Tensor:
        """The unweighted pixel loss of this rank's ``rows``: x0, x1, velocity
        (B, C, T', H', W') and t (B,) as ``latent_flow_loss`` drew and predicted them."""
        starts = self.draw_starts(draws, rows, tuple(x1.shape[2:]))
        return self.errors(x0, x1, t, velocity, starts).mean()

    def add(self, latent_loss: torch.Tensor, prediction: tuple[torch.Tensor, ...],
            draws: StepDraws, rows: slice
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(latent loss + weight × pixel loss, both terms as metrics) for ``prediction``
        = (x0, x1, t, velocity) of the step."""
        pixel = self(*prediction, draws, rows)
        return (latent_loss + self.cfg.weight * pixel,
                {"latent_loss": latent_loss.detach(), "pixel_loss": pixel.detach()})
