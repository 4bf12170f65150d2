"""Does a text-to-video model follow its prompts? Sample the captions of held-out synthetic
clips (the validation split, never trained on) and judge the videos (``data.judges``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from data.judges import match_rates
from data.synthetic import SyntheticVideos
from trainer.sampling import generate


def held_out_prompts(data: Any, count: int) -> list[str]:
    """The captions of the first ``count`` clips of the synthetic set's validation split."""
    val = SyntheticVideos(count, data.frames, data.height, data.width, data.fps, data.seed,
                          split="val")
    return [val.spec(i).caption for i in range(count)]


@torch.no_grad()
def sample_and_judge(model: nn.Module, autoencoder: nn.Module, prompts: list[str],
                     latent_shape: tuple[int, int, int, int], steps: int,
                     guidance_scale: float, seed: int, batch: int = 8
                     ) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Sample ``prompts`` in chunks of ``batch``, the chunk that starts at prompt i seeded
    ``seed + i`` -> (videos (3, T, H, W) in [-1, 1], the judges' match rate per attribute)."""
    videos = []
    for start in range(0, len(prompts), batch):
        videos.extend(generate(model, autoencoder, prompts[start: start + batch], latent_shape,
                               steps, guidance_scale, seed=seed + start).float().cpu())
    return videos, match_rates(videos, prompts)
