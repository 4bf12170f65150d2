"""The flow-matching training objective over one batch, with caption dropout.

All randomness comes from the ``generator`` passed in (seeded per step by the loop), so a
step's loss is a pure function of (weights, batch, step): resuming reproduces it bitwise.
"""

from __future__ import annotations

import torch
from torch import nn

from models.flow import FlowMatching
from models.t2v import TextToVideo


def caption_keep_mask(count: int, probability: float,
                      generator: torch.Generator) -> torch.Tensor:
    """(count,) bool: False where a caption is dropped (replaced by "")."""
    return torch.rand(count, generator=generator) >= probability


def drop_captions(captions: list[str], keep: torch.Tensor) -> list[str]:
    """Replace captions by "" where ``keep`` is False, so the unconditional branch is
    learned."""
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def flow_matching_loss(model: TextToVideo, autoencoder: nn.Module, flow: FlowMatching,
                       video: torch.Tensor, captions: list[str], generator: torch.Generator,
                       caption_dropout: float = 0.0, rows: slice | None = None,
                       global_batch: int | None = None) -> torch.Tensor:
    """video (B, 3, T, H, W) in [-1, 1] -> scalar MSE between predicted and target velocity.

    Under data parallelism ``video`` holds ``rows`` of a global batch of ``global_batch``:
    caption dropout, noise and t are drawn for the whole global batch and sliced, so the
    result does not depend on how the batch is split over ranks.
    """
    with torch.no_grad():
        x1 = autoencoder.encode(video)
    rows = rows or slice(0, x1.shape[0])
    total = global_batch or x1.shape[0]
    captions = drop_captions(captions, caption_keep_mask(total, caption_dropout, generator)[rows])
    x0 = torch.randn((total, *x1.shape[1:]), generator=generator)[rows].to(x1.device, x1.dtype)
    t = flow.sample_t(total, generator)[rows].to(x1.device)
    velocity = model(flow.interpolate(x0, x1, t), t, captions)
    return flow.loss(velocity, x0, x1)


@torch.no_grad()
def text_sensitivity(model: TextToVideo, autoencoder: nn.Module, flow: FlowMatching,
                     video: torch.Tensor, captions: list[str],
                     generator: torch.Generator) -> float:
    """||v(x_t, caption) - v(x_t, "")|| / ||v(x_t, caption)|| at t = 0.5.

    Near 0 means the model ignores its text (e.g. a text pathway collapsed onto one
    context) even while the loss falls; classifier-free guidance then does nothing.
    """
    x1 = autoencoder.encode(video)
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device, x1.dtype)
    t = torch.full((x1.shape[0],), 0.5, device=x1.device)
    x_t = flow.interpolate(x0, x1, t)
    conditional = model(x_t, t, captions)
    unconditional = model(x_t, t, [""] * len(captions))
    return ((conditional - unconditional).norm() / conditional.norm()).item()
