"""The text-to-video task: a text-conditioned DiT trained by flow matching on the frozen
autoencoder's latents. The loop in ``trainer.train`` is generic; a task says what the
model is, what one step's loss is, how to validate, and what to show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.contact_sheet import write_contact_sheet
from data.latent_shards import LatentDataConfig, cache_dir, load_null_text
from models.dit import patch_grid
from parallel.mesh import ParallelContext
from trainer.build import build_autoencoder, build_flow, build_model
from trainer.config import SyntheticDataConfig, TrainConfig
from trainer.draws import StepDraws
from trainer.objective import Text, latent_flow_loss, text_sensitivity
from trainer.pixel_loss import build_pixel_loss
from trainer.precision import autocast
from trainer.sampling import generate, write_videos
from trainer.start_checks import check_cache_matches, check_latent_fits
from trainer.text_following import held_out_prompts, sample_and_judge


class TextToVideoTask:
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        self.autoencoder = build_autoencoder(cfg, ctx.device)
        self.latent_shape = check_latent_fits(cfg, self.autoencoder)
        self.flow = build_flow(cfg)
        self.pixel_loss = build_pixel_loss(cfg, self.autoencoder, self.flow)  # None: off
        self.null_text = None  # the cached encoding of "", with data=latents
        if isinstance(cfg.data, LatentDataConfig):
            check_cache_matches(cfg, cfg.data)
            self.null_text = load_null_text(cache_dir(cfg.data))

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.ctx)

    def describe(self) -> str:
        return (f"at most {math.prod(patch_grid(self.cfg.model, self.latent_shape)):,} "
                f"video tokens per sample")

    def loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws,
             rows: slice, global_batch: int, step: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's ``rows`` of the global batch -> (loss, no extra metrics; with
        ``recipe.pixel_loss`` the latent and pixel terms)."""
        x1, text = self.latents_and_text(batch)
        drawn = []  # this step's (x0, x1, t, velocity), for the pixel-space loss
        keep = (lambda *prediction: drawn.append(prediction)) if self.pixel_loss else None
        loss = latent_flow_loss(model, self.flow, x1, text, draws,
                                self.cfg.recipe.caption_dropout, rows, self.null_text,
                                on_prediction=keep)
        if self.pixel_loss is None:
            return loss, {}
        return self.pixel_loss.add(loss, drawn[0], draws, rows)

    @torch.no_grad()
    def latents_and_text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Text]:
        """x1 (B, C, T', H', W') and the model's text input: a cached batch's latents and
        encodings as they are, else the autoencoder's latents of the video and the
        captions (encoded in the model's forward)."""
        device = self.ctx.device
        if "latent" in batch:
            text = {name: (states.to(device), mask.to(device))
                    for name, (states, mask) in batch["text"].items()}
            return batch["latent"].to(device), text
        return self.autoencoder.encode(batch["video"].to(device)), batch["caption"]

    def tokens(self, batch: dict[str, Any]) -> int:
        """Video tokens in this rank's batch (the DiT's patches of its latents)."""
        if "latent" in batch:
            batch_size, *latent = batch["latent"].shape
        else:
            batch_size, _, frames, height, width = batch["video"].shape
            latent = self.autoencoder.latent_shape(frames, height, width)
        return batch_size * math.prod(patch_grid(self.cfg.model, latent))

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Mean loss over the first ``val_batches`` held-out batches with fixed noise and t,
        the text sensitivity of the first batch and, with ``data.judge_prompts``, the
        judges' match rates on samples of held-out captions (``colour_match``, ...). Every
        rank runs the same full batches and samples (sharded models need all ranks in the
        forward) and gets the same numbers."""
        cfg, device = self.cfg, self.ctx.device
        generator = torch.Generator().manual_seed(cfg.trainer.seed)
        # "step 0" is never a training step: the held-out batches are its rows, in order
        draws, offset = StepDraws(cfg.trainer.seed, 0, device), 0
        losses, sensitivity = [], 0.0
        for index, batch in enumerate(islice(batches, cfg.trainer.val_batches)):
            with autocast(cfg, device):
                x1, text = self.latents_and_text(batch)
                rows = slice(offset, offset + x1.shape[0])
                offset = rows.stop
                losses.append(latent_flow_loss(model, self.flow, x1, text, draws, rows=rows,
                                               null_text=self.null_text).item())
                if index == 0:
                    sensitivity = text_sensitivity(model, self.flow, x1, text, generator,
                                                   self.null_text)
        metrics = {"loss": sum(losses) / len(losses), "text_sensitivity": sensitivity}
        if isinstance(cfg.data, SyntheticDataConfig) and cfg.data.judge_prompts:
            prompts = held_out_prompts(cfg.data, cfg.data.judge_prompts)
            with autocast(cfg, device):
                _, rates = sample_and_judge(model, self.autoencoder, prompts, self.latent_shape,
                                            cfg.trainer.judge_steps, cfg.trainer.guidance_scale,
                                            seed=cfg.trainer.seed)
            metrics |= {f"{attribute}_match": rate for attribute, rate in rates.items()}
        return metrics

    def show(self, step: int, run_dir: Path, model: nn.Module, monitor) -> None:
        """Sample the configured prompts: every rank samples (the model may be sharded),
        rank 0 writes and logs the videos and their contact sheet."""
        prompts = list(self.cfg.trainer.sample_prompts)
        if not prompts:
            return
        trainer = self.cfg.trainer
        videos = generate(model, self.autoencoder, prompts, self.latent_shape,
                          trainer.sample_steps, trainer.guidance_scale, seed=trainer.seed)
        if monitor.enabled:
            directory = run_dir / "samples" / f"step_{step:08d}"
            paths = write_videos(videos, prompts, directory, self.cfg.data.fps)
            monitor.log_videos(paths, prompts, step)
            sheet = write_contact_sheet(directory / "contact_sheet.png", videos, prompts)
            monitor.log_image(sheet, f"step {step}: one row per prompt", step)
