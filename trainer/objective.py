"""The flow-matching training objective over one batch, with caption dropout.

All randomness comes from the step's ``StepDraws`` (keyed per global sample), so a step's
loss is a pure function of (weights, batch, step): resuming reproduces it bitwise, and a
data-parallel rank draws only its own rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.flow import FlowMatching
from models.t2v import TextToVideo
from trainer.draws import StepDraws


def caption_keep_mask(draws: StepDraws, rows: slice, probability: float) -> torch.Tensor:
    """(rows,) bool: False where a caption is dropped (replaced by "")."""
    uniform = draws.per_sample("caption_dropout", rows,
                               lambda g: torch.rand(1, generator=g, device=g.device))
    return uniform >= probability


def drop_captions(captions: list[str], keep: torch.Tensor) -> list[str]:
    """Replace captions by "" where ``keep`` is False, so the unconditional branch is
    learned."""
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


Text = list[str] | dict[str, tuple[torch.Tensor, torch.Tensor]]  # captions or encodings


def null_text_like(text: Text, null_text: dict | None) -> Text:
    """The unconditional text for a batch: "" per caption, or the cached encoding of ""
    ({name: (states (1, L, E), mask (1, L))}) repeated per row of encoded text."""
    if isinstance(text, list):
        return [""] * len(text)
    if null_text is None:
        raise ValueError("cached text encodings need the cache's null_text encoding")
    rows = next(iter(text.values()))[0].shape[0]
    return {name: (null_text[name][0].to(states).expand(rows, -1, -1),
                   null_text[name][1].to(mask.device).expand(rows, -1))
            for name, (states, mask) in text.items()}


def drop_text(text: Text, keep: torch.Tensor, null_text: dict | None = None) -> Text:
    """Captions, or cached encodings, with the rows where ``keep`` is False replaced by
    the empty caption ("" or its cached encoding)."""
    if isinstance(text, list):
        return drop_captions(text, keep)
    null = null_text_like(text, null_text)
    keep = keep.to(next(iter(text.values()))[0].device)
    return {name: (torch.where(keep[:, None, None], states, null[name][0]),
                   torch.where(keep[:, None], mask, null[name][1]))
            for name, (states, mask) in text.items()}


def flow_matching_loss(model: TextToVideo, autoencoder: nn.Module, flow: FlowMatching,
                       video: torch.Tensor, captions: list[str], draws: StepDraws,
                       caption_dropout: float = 0.0, rows: slice | None = None
                       ) -> torch.Tensor:
    """video (B, 3, T, H, W) in [-1, 1] -> ``latent_flow_loss`` of its latents."""
    with torch.no_grad():
        x1 = autoencoder.encode(video)
    return latent_flow_loss(model, flow, x1, captions, draws, caption_dropout, rows)


def draw_noise_and_t(flow: FlowMatching, draws: StepDraws, rows: slice, x1: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise x0 (rows, *x1.shape[1:]) on x1's device and dtype and t (rows,) of the
    global samples ``rows``: the same draws whichever task, rank or side asks for them."""
    x0 = draws.per_sample("noise", rows, lambda g: flow.noise((1, *x1.shape[1:]), g))
    t = draws.per_sample("t", rows, lambda g: flow.sample_t(1, g))
    return x0.to(x1.device, x1.dtype), t.to(x1.device)


def latent_flow_loss(model: TextToVideo, flow: FlowMatching, x1: torch.Tensor, text: Text,
                     draws: StepDraws, caption_dropout: float = 0.0,
                     rows: slice | None = None, null_text: dict | None = None,
                     on_prediction: Callable[..., None] | None = None) -> torch.Tensor:
    """x1 latents (B, C, T', H', W') and their captions or cached encodings (``null_text``:
    the cached encoding of "", for caption dropout) -> scalar MSE between predicted and
    target velocity. ``on_prediction(x0, x1, t, velocity)``, if given, sees this step's
    draws and prediction (the pixel-space loss reuses them).

    Under data parallelism ``x1`` holds ``rows`` (default: all B) of the global batch; the
    caption dropout, noise and t of exactly those samples are drawn, so the result does
    not depend on how the batch is split over ranks.
    """
    rows = rows or slice(0, x1.shape[0])
    if rows.stop - rows.start != x1.shape[0]:
        raise ValueError(f"rows {rows} do not match the {x1.shape[0]} latents given")
    text = drop_text(text, caption_keep_mask(draws, rows, caption_dropout), null_text)
    x0, t = draw_noise_and_t(flow, draws, rows, x1)
    velocity = model(flow.interpolate(x0, x1, t), t, text)
    if on_prediction is not None:
        on_prediction(x0, x1, t, velocity)
    return flow.loss(velocity, x0, x1)


@torch.no_grad()
def text_sensitivity(model: TextToVideo, flow: FlowMatching, x1: torch.Tensor, text: Text,
                     generator: torch.Generator, null_text: dict | None = None) -> float:
    """||v(x_t, text) - v(x_t, "")|| / ||v(x_t, text)|| at t = 0.5, for latents x1.

    Near 0 means the model ignores its text (e.g. a text pathway collapsed onto one
    context) even while the loss falls; classifier-free guidance then does nothing.
    """
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device, x1.dtype)
    t = torch.full((x1.shape[0],), 0.5, device=x1.device)
    x_t = flow.interpolate(x0, x1, t)
    conditional = model(x_t, t, text)
    unconditional = model(x_t, t, null_text_like(text, null_text))
    return ((conditional - unconditional).norm() / conditional.norm()).item()
