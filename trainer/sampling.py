"""Generate videos from prompts with a text-to-video model, and write them as mp4."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from data.video import video_to_uint8, write_video
from models.sampler import euler_sample, guided_velocity, linear_quadratic_schedule
from models.t2v import TextToVideo


@torch.no_grad()
def generate(model: TextToVideo, autoencoder: nn.Module, prompts: list[str],
             latent_shape: tuple[int, int, int, int], steps: int, guidance_scale: float,
             seed: int) -> torch.Tensor:
    """prompts -> videos (B, 3, T, H, W) in [-1, 1]; the same seed gives the same videos."""
    device = next(model.parameters()).device
    context, mask = model.text(prompts)
    null_context, null_mask = model.text([""] * len(prompts))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *latent_shape), generator=generator).to(device)
    velocity = guided_velocity(model.dit, context, mask, null_context, null_mask,
                               guidance_scale)
    latent = euler_sample(velocity, noise, linear_quadratic_schedule(steps))
    return autoencoder.decode(latent).clamp(-1, 1)


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
