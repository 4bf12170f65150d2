"""Generate videos from prompts with a text-to-video model, and write them as mp4."""

from __future__ import annotations

import dataclasses
import re
from contextlib import nullcontext
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from data.video import video_to_uint8, write_video
from models.block_cache import CacheSettings
from models.sampler import GuidanceTrace, GuidedVelocity, euler_sample, linear_quadratic_schedule
from models.t2v import TextToVideo


class Guidance(Enum):
    """How the sampler guides: conditional only, classifier-free guidance at every step,
    Adaptive Guidance (CFG until conditional and unconditional velocities agree), or
    LinearAG (adaptive, with every other unconditional pass predicted from a calibration
    file, ``trainer.linear_guidance``)."""

    none = "none"
    cfg = "cfg"
    adaptive = "adaptive"
    linear_ag = "linear_ag"


class Cache(Enum):
    """Which DiT blocks a sampling run may reuse from an earlier step (``models.block_cache``):
    none, a calibrated per-block schedule (``trainer.block_cache_calibration``), or the
    first-block or TeaCache dynamic rules that need no calibration."""

    none = "none"
    block = "block"
    first_block = "first_block"
    teacache = "teacache"


@torch.no_grad()
def generate_traced(model: TextToVideo, autoencoder: nn.Module, prompts: list[str],
                    latent_shape: tuple[int, int, int, int], steps: int,
                    guidance_scale: float, seed: int, guidance: Guidance | str = Guidance.cfg,
                    threshold: float = 0.99, linear: torch.Tensor | None = None,
                    times: torch.Tensor | None = None, cache: CacheSettings | None = None,
                    start: torch.Tensor | None = None) -> tuple[torch.Tensor, GuidanceTrace]:
    """prompts -> (videos (B, 3, T, H, W) in [-1, 1], what guidance did per sample); the
    same seed gives the same videos. ``threshold`` is adaptive guidance's cosine bound,
    ``linear`` LinearAG's (steps, 3) coefficients, ``times`` the (steps + 1,) Euler times
    (default: the linear-quadratic schedule; a distilled student's own times), ``cache``
    which DiT blocks may be reused between steps (``models.block_cache``; default none),
    ``start`` the (B, *latent_shape) latent at ``times[0]`` (default: the seed's noise; a
    noised clip to sample on from a later time). The trace counts the blocks each sample ran."""
    device = next(model.parameters()).device
    context, mask = model.text(prompts)
    null_context, null_mask = model.text([""] * len(prompts))
    if start is None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn((len(prompts), *latent_shape), generator=generator)
    velocity = GuidedVelocity(model.dit, context, mask, null_context, null_mask,
                              guidance_scale, Guidance(guidance).value, threshold, linear)
    if times is None:
        times = linear_quadratic_schedule(steps)
    elif len(times) != steps + 1:
        raise ValueError(f"{len(times)} sampling times do not make {steps} steps")
    block_cache = (cache or CacheSettings()).new_cache()
    with nullcontext() if block_cache.mode == "none" else block_cache.attached(model.dit):
        latent = euler_sample(velocity, start.to(device), times)
    trace = velocity.trace()
    if block_cache.mode == "none":
        blocks = trace.nfe * len(model.dit.blocks)
    else:  # rows are (conditional, unconditional) x samples, every step the same rows
        blocks = block_cache.evaluations.view(-1, len(prompts)).sum(0)
    return autoencoder.decode(latent).clamp(-1, 1), dataclasses.replace(
        trace, block_evaluations=blocks)


def generate(model: TextToVideo, autoencoder: nn.Module, prompts: list[str],
             latent_shape: tuple[int, int, int, int], steps: int, guidance_scale: float,
             seed: int, guidance: Guidance | str = Guidance.cfg,
             threshold: float = 0.99, linear: torch.Tensor | None = None,
             times: torch.Tensor | None = None,
             cache: CacheSettings | None = None) -> torch.Tensor:
    """prompts -> videos (B, 3, T, H, W) in [-1, 1]; ``generate_traced`` without the trace."""
    return generate_traced(model, autoencoder, prompts, latent_shape, steps, guidance_scale,
                           seed, guidance, threshold, linear, times, cache)[0]


def prompt_slug(prompt: str, max_chars: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_chars] or "empty"


def write_videos(videos: torch.Tensor, prompts: list[str], directory: Path,
                 fps: float) -> list[Path]:
    """One mp4 per prompt, named ``<index>_<prompt slug>.mp4``."""
    paths = []
    for index, (video, prompt) in enumerate(zip(videos, prompts, strict=True)):
        path = Path(directory) / f"{index:02d}_{prompt_slug(prompt)}.mp4"
        write_video(path, video_to_uint8(video.float().cpu()), fps)
        paths.append(path)
    return paths
