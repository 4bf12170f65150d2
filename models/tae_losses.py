"""Training losses of the TAE (arXiv 2410.13720 §3) and its optional patch discriminator.

``tae_loss`` = rec + kl_weight·KL + opl_weight·OPL
               [+ λ·disc_weight·generator hinge + discriminator hinge, from ``disc_start``],
rec = l1_weight·L1 + l2_weight·MSE (L1 alone by default), λ the adaptive weight on rec.

The generator and discriminator terms share one backward and one optimizer: the generator
term runs the discriminator with its parameters detached (so it only trains the
autoencoder) and the discriminator term sees the reconstruction detached (so it only
trains the discriminator). The perceptual loss of arXiv 2410.13720 §3 needs pretrained weights
(LPIPS) and is not here.

Shapes: video and reconstruction (B, 3, T, H, W); posterior mean and logvar
(B, C, T', H', W').
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.init import init_parameters


@dataclass
class TAELossConfig:
    """Weights of the TAE objective."""

    l1_weight: float = 1.0
    # MSE pulls to the mean where L1 pulls to the median: on frames that are mostly
    # background, L1 alone keeps the background and blurs small coloured objects away
    l2_weight: float = 0.0
    kl_weight: float = 1.0e-6
    opl: bool = True  # the outlier penalty can cost image quality, so it is a switch
    opl_weight: float = 1.0e5
    opl_r: float = 3.0
    disc_weight: float = 0.5
    disc_start: int = 0  # first step with adversarial terms; a discriminator must be given
    adaptive_weight_max: float = 1.0e4

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "kl_weight", "opl_weight", "opl_r",
                     "disc_weight", "adaptive_weight_max", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe.loss.{name}={getattr(self, name)} must be >= 0")
        if self.l1_weight == self.l2_weight == 0:
            raise ValueError("recipe.loss.l1_weight and recipe.loss.l2_weight are both 0: "
                             "give the reconstruction a weight")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over all elements."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def outlier_penalty_loss(z: torch.Tensor, r: float = 3.0) -> torch.Tensor:
    """Movie Gen's OPL on latents z (B, C, T', H', W').

    Our reading of ``mean over positions of max(||z - mean(z)|| - r·||std(z)||, 0)``: per
    sample, mean(z) and std(z) are C-vectors taken per channel over the T'·H'·W' positions
    (population std); ||z - mean(z)|| is the L2 norm over channels at each position and
    ||std(z)|| the L2 norm of the std vector; the hinge is averaged over positions and
    samples. Gradients flow through the statistics too, as the formula is written. A lone
    spot also inflates the std, so it is caught only among more than r² + 1 positions.
    """
    positions = z.flatten(2)
    centre = positions.mean(dim=2, keepdim=True)
    spread = positions.std(dim=2, correction=0).norm(dim=1)
    distance = (positions - centre).norm(dim=1)
    return F.relu(distance - r * spread[:, None]).mean()


class PatchDiscriminator(nn.Module):
    """3D PatchGAN: video (B, C, T, H, W) -> logits (B, 1, T, H/2^layers, W/2^layers) roughly.

    Convs are 3x4x4 (zero padding in time, so a one-frame video works), strided 2 in space
    only; group norm rather than batch norm, whose statistics would differ across
    data-parallel shards. ``forward(x, detach_params=True)`` uses detached parameters
    through functional calls, so the generator's adversarial term sends no gradient to the
    discriminator; it runs inside this module's own call, where an FSDP-wrapped
    discriminator has its parameters gathered.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3,
                 groups: int = 8):
        super().__init__()
        widths = [in_channels] + [channels * 2 ** min(i, 3) for i in range(layers)]
        self.convs = nn.ModuleList(
            nn.Conv3d(widths[i], widths[i + 1], (3, 4, 4), stride=(1, 2, 2), padding=1)
            for i in range(layers))
        # the first layer sees raw pixels; normalising it would discard their scale
        self.norms = nn.ModuleList(nn.GroupNorm(groups, w) for w in widths[2:])
        self.head = nn.Conv3d(widths[-1], 1, 3, padding=1)

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from (seed, parameter name); works after ``to_empty``."""
        init_parameters(self, seed)

    @staticmethod
    def _conv(conv: nn.Conv3d, x: torch.Tensor, detach: bool) -> torch.Tensor:
        weight, bias = conv.weight, conv.bias
        if detach:
            weight, bias = weight.detach(), bias.detach()
        return F.conv3d(x, weight, bias, conv.stride, conv.padding)

    def forward(self, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = self._conv(conv, x, detach_params)
            if i > 0:
                norm = self.norms[i - 1]
                weight, bias = norm.weight, norm.bias
                if detach_params:
                    weight, bias = weight.detach(), bias.detach()
                x = F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
            x = F.leaky_relu(x, 0.2)
        return self._conv(self.head, x, detach_params)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: mean(relu(1 - real)) + mean(relu(1 + fake)), halved."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: -mean(fake logits)."""
    return -fake_logits.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor,
                        reconstruction: torch.Tensor, max_weight: float,
                        sum_squares: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """λ = ||∂rec_loss/∂x|| / (||∂gan_loss/∂x|| + 1e-4) for x the reconstruction, clamped to
    [0, max_weight], 0 when not finite; a detached scalar.

    ``sum_squares`` turns this rank's squared gradient norms (a (2,) tensor) into the
    global batch's: under data parallelism each rank holds some rows of x, and λ must be
    one number for the whole batch, as in a single process.

    Taming-transformers takes these gradients at the decoder's last weight. We take them
    at the reconstruction: the decoder may be FSDP-sharded, where a weight's gradient is a
    shard (its norm would need a collective and autograd.grad on it bypasses the reduce
    hooks), while the reconstruction is a plain local tensor on every rank.
    """
    rec_grad, = torch.autograd.grad(rec_loss, reconstruction, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, reconstruction, retain_graph=True)
    squares = torch.stack([rec_grad.pow(2).sum(), gan_grad.pow(2).sum()])
    if sum_squares is not None:
        squares = sum_squares(squares)
    rec_norm, gan_norm = squares.sqrt()
    weight = rec_norm / (gan_norm + 1e-4)
    weight = torch.where(torch.isfinite(weight), weight.clamp(0.0, max_weight), 0.0)
    return weight.detach()


def tae_loss(video: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor,
             logvar: torch.Tensor, cfg: TAELossConfig, step: int,
             discriminator: PatchDiscriminator | None = None,
             sum_squares: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TAE objective -> (total, metrics of detached scalars).

    OPL is taken on the posterior mean: those are the latents the DiT sees, and the
    sampling noise would blur the statistics it compares against.

    The reconstruction must be part of the autograd graph when the adversarial terms are on
    (``discriminator`` given and ``step >= cfg.disc_start``).
    """
    error = reconstruction - video
    l1, l2 = error.abs().mean(), error.square().mean()
    rec = cfg.l1_weight * l1 + cfg.l2_weight * l2
    kl = kl_loss(mean, logvar)
    total = rec + cfg.kl_weight * kl
    metrics = {"l1": l1, "l2": l2, "kl": kl}
    if cfg.opl:
        opl = outlier_penalty_loss(mean, cfg.opl_r)
        total = total + cfg.opl_weight * opl
        metrics["opl"] = opl
    if discriminator is not None and step >= cfg.disc_start:
        gen_adv = generator_adversarial_loss(discriminator(reconstruction, detach_params=True))
        weight = adaptive_gan_weight(rec, gen_adv, reconstruction, cfg.adaptive_weight_max,
                                     sum_squares)
        # A host sync, once a step: a non-finite GAN gradient must stay out of the backward
        # graph entirely, since 0 x inf there is still NaN.
        if weight > 0 and torch.isfinite(gen_adv):
            total = total + weight * cfg.disc_weight * gen_adv
        disc = discriminator_loss(discriminator(video), discriminator(reconstruction.detach()))
        total = total + disc
        metrics |= {"gen_adv": gen_adv, "adaptive_weight": weight, "disc": disc}
    return total, {name: value.detach() for name, value in metrics.items()}
