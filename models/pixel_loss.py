"""The pixel-space loss of latent-diffusion post-training (arXiv 2409.17565) under the
straight flow of models/flow.py: plain functions on tensors and a decoder.

The paper adds λ·‖D(x_t) − D(x̃_t)‖² to the latent loss: D the frozen decoder, x_t the
true noisy latent and x̃_t the same latent rebuilt from the true clean latent and the
*predicted* noise. Under our flow, with c = 1 − σmin:

    x_t = t·x1 + (1 − c·t)·x0,  v = x1 − c·x0   ⇒   x_t = x0 + t·v   (exactly)
    predicted noise     x̂0 = x_t − t·v̂
    rebuilt latent      x̃_t = t·x1 + (1 − c·t)·x̂0
    ⇒   x̃_t − x_t = (1 − c·t)·(x̂0 − x0) = −t·(1 − c·t)·(v̂ − v)
                    → −t·(1 − t)·(v̂ − v)   as σmin → 0.

So the noise form decodes x_t and x_t − t(1 − ct)(v̂ − v): the velocity error weighted by
a factor that vanishes at both ends of the path. The clean-estimate form (``target=
"clean"``) decodes x1 and x̂1 = c·x_t + (1 − c·t)·v̂, with x̂1 − x1 = (1 − c·t)(v̂ − v); the
paper found it blurry. For a linear D the loss is D applied to those differences; the
identity autoencoder (space-to-depth, a permutation) keeps the squared norm, so its
noise-form loss is mean((t(1 − ct))²·(v̂ − v)²) over the latent elements.

Memory: only a window of each sample's latent is decoded — at most ``frames`` consecutive
latent frames and a crop of latent rows and columns, at starts drawn per sample from the
step's generator — and the reference decode (D(x_t) or D(x1)) runs without grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.flow import FlowMatching, _expand

Decode = Callable[[torch.Tensor], torch.Tensor]  # latent (B, C, T', H', W') -> pixels


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or wider if it is (the loss is never taken in bf16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def noisy_latent_error(velocity: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                       sigma_min: float) -> torch.Tensor:
    """x̃_t − x_t = −t·(1 − (1 − σmin)·t)·(v̂ − v); velocity, target (B, ...), t (B,)."""
    error = _wide(velocity) - _wide(target)
    t = _expand(t, error)
    return -t * (1 - (1 - sigma_min) * t) * error


def decoded_pair(flow: FlowMatching, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                 velocity: torch.Tensor, target: str = "noise"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents whose decodes the loss compares, each (B, C, T', H', W') in fp32 (or
    wider): (x_t, x̃_t) for ``target="noise"``, (x1, x̂1) for ``target="clean"``. Only the
    second depends on the prediction (and carries its gradient)."""
    x0, x1 = _wide(x0), _wide(x1)
    x_t = flow.interpolate(x0, x1, t)
    if target == "noise":
        return x_t, x_t + noisy_latent_error(velocity, flow.target(x0, x1), t, flow.sigma_min)
    if target == "clean":
        return x1, flow.predicted_data(x_t, _wide(velocity), t)
    raise ValueError(f"pixel loss target={target!r} must be 'noise' or 'clean'")


def draw_windows(generator: torch.Generator, count: int, size: tuple[int, int, int],
                 window: tuple[int, int, int]) -> torch.Tensor:
    """(count, 3) start indices along (T', H', W') of a ``window``-sized box inside a latent
    of ``size``, uniform per sample, on the generator's device."""
    for n, k in zip(size, window, strict=True):
        if not 0 < k <= n:
            raise ValueError(f"window {window} does not fit inside the latent {size}")
    return torch.stack([torch.randint(0, n - k + 1, (count,), generator=generator,
                                      device=generator.device)
                        for n, k in zip(size, window, strict=True)], dim=1)


def take_windows(x: torch.Tensor, starts: torch.Tensor,
                 window: tuple[int, int, int]) -> torch.Tensor:
    """x (B, C, T', H', W'), starts (B, 3) -> (B, C, *window): each sample's own box."""
    if tuple(x.shape[2:]) == tuple(window):
        return x
    f, h, w = window
    return torch.stack([x[i, :, a:a + f, b:b + h, c:c + w]
                        for i, (a, b, c) in enumerate(starts.tolist())])


def pixel_space_errors(decode: Decode, reference: torch.Tensor,
                       prediction: torch.Tensor) -> torch.Tensor:
    """(B,) mean over each sample's pixels of (D(prediction) − D(reference))², fp32.
    D(reference) does not depend on the model, so it is decoded without grad (nothing kept
    for backward); gradients reach the model through D(prediction)."""
    with torch.no_grad():
        expected = _wide(decode(reference))
    error = (_wide(decode(prediction)) - expected) ** 2
    return error.reshape(error.shape[0], -1).mean(dim=1)


def pixel_space_loss(decode: Decode, reference: torch.Tensor,
                     prediction: torch.Tensor) -> torch.Tensor:
    """The mean of ``pixel_space_errors``: every sample decodes the same window, so this is
    the mean over all pixels of the batch, an fp32 scalar."""
    return pixel_space_errors(decode, reference, prediction).mean()


def decoder_blocks(autoencoder: nn.Module) -> list[nn.Module]:
    """The decoder's blocks to checkpoint one at a time (each keeps only its input for
    backward): the TAE's mid-block parts, every level's residual and upsampling blocks and
    its output conv. The identity autoencoder has none."""
    decoder = getattr(autoencoder, "decoder", None)
    if decoder is None:
        return []
    blocks = [*decoder.mid.children(), *(block for level in decoder.levels for block in level),
              decoder.conv_out]
    return [block for block in blocks if not isinstance(block, nn.Identity)]
