"""Load a trained run, generate videos from prompts, and write them as mp4."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.video import video_to_uint8, write_video
from models.sampler import euler_sample, guided_velocity, linear_quadratic_schedule
from models.t2v import TextToVideo
from parallel.checkpoint import Checkpointer, load_deepspeed_weights, load_training_state
from trainer.build import build_autoencoder, build_model, single_process
from trainer.config import TrainConfig, check_latent_fits
from trainer.ema import EMA
from trainer.run_config import load_run_config


@dataclass
class TrainedRun:
    cfg: TrainConfig
    run_dir: Path
    step: int
    model: TextToVideo
    autoencoder: nn.Module
    latent_shape: tuple[int, int, int, int]


def locate_checkpoint(checkpoint: Path) -> tuple[Path, Path]:
    """(run dir, intact checkpoint dir) from a run dir or one of its ``checkpoints/step_N``."""
    if checkpoint.name.startswith("step_") and checkpoint.parent.name == "checkpoints":
        problem = Checkpointer.verify(checkpoint)
        if problem:
            raise ValueError(f"checkpoint={checkpoint} is damaged: {problem}")
        return checkpoint.parent.parent, checkpoint
    found = Checkpointer(checkpoint / "checkpoints", keep_last=0).latest()
    if found is None:
        raise FileNotFoundError(f"checkpoint={checkpoint} has no intact checkpoint under "
                                f"{checkpoint / 'checkpoints'}")
    return checkpoint, found


def load_trained(checkpoint: Path, device: torch.device, ema: bool = True,
                 frames: int | None = None, height: int | None = None,
                 width: int | None = None) -> TrainedRun:
    """Rebuild a run's model in this one process from its saved config and load its
    weights (EMA by default), whatever mesh trained it.

    frames/height/width default to the run's data settings.
    """
    run_dir, step_dir = locate_checkpoint(Path(checkpoint))
    cfg = load_run_config(run_dir)
    cfg.data.frames = frames or cfg.data.frames
    cfg.data.height = height or cfg.data.height
    cfg.data.width = width or cfg.data.width
    autoencoder = build_autoencoder(cfg, device)
    latent_shape = check_latent_fits(cfg, autoencoder)
    model = build_model(cfg, single_process(device))
    averaged = EMA({n: p for n, p in model.named_parameters() if p.requires_grad},
                   cfg.recipe.ema_decay)
    if (step_dir / "deepspeed").is_dir():
        state = load_deepspeed_weights(step_dir, model, averaged.state_dict())
    else:
        state = load_training_state(step_dir, model, None, averaged.state_dict())
    if ema:
        averaged.swap()
    return TrainedRun(cfg, run_dir, state["step"], model.eval(), autoencoder, latent_shape)


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
