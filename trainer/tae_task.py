"""The autoencoder task (``task=tae``, ``experiment=tae_tiny``): train the temporal
autoencoder with L1 + KL + outlier penalty (+ an optional patch discriminator) in the same
loop, engine, checkpoints and data pipeline as the DiT. Validation reports PSNR and SSIM
of posterior-mean reconstructions; ``show`` writes inputs and reconstructions side by
side as videos and logs them to wandb.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from models.tae_losses import PatchDiscriminator, tae_loss
from models.tae_training import AutoencoderTraining
from parallel.mesh import ParallelContext
from parallel.parallelize import materialise, parallelize_autoencoder
from trainer.config import TrainConfig
from trainer.data import build_val_batches
from trainer.draws import StepDraws
from trainer.precision import autocast, param_dtype
from trainer.sampling import write_videos
from trainer.video_quality import psnr, ssim


class AutoencoderTask:
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        self.val_batches = build_val_batches(cfg)

    def build_model(self) -> AutoencoderTraining:
        """The TAE (+ discriminator) on meta, sharded over the data-parallel ranks, then
        materialised with the initial values of ``trainer.seed``."""
        recipe = self.cfg.recipe
        with torch.device("meta"):
            discriminator = (PatchDiscriminator(channels=recipe.disc_channels,
                                                layers=recipe.disc_layers)
                             if recipe.discriminator else None)
            model = AutoencoderTraining(instantiate(self.cfg.autoencoder), discriminator)
        parallelize_autoencoder(model, self.ctx, param_dtype(self.cfg, self.ctx.device))
        materialise(model, self.ctx.device, self.cfg.trainer.seed)
        # a function of the video size here; the DiT task's latent_shape is one shape
        self.latent_shape_of = model.autoencoder.latent_shape
        return model

    def describe(self) -> str:
        data = self.cfg.data
        shape = (getattr(data, "frames", "T"), getattr(data, "height", "H"),
                 getattr(data, "width", "W"))
        ae = self.cfg.autoencoder
        return (f"TAE {ae.temporal_compression}x{ae.spatial_compression}x"
                f"{ae.spatial_compression} compression to {ae.latent_channels} channels; "
                f"video {'x'.join(map(str, shape))}")

    def loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws,
             rows: slice, global_batch: int, step: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's ``rows`` of the global batch -> (loss, its terms). The posterior
        noise of each sample is keyed by its global index, so the split does not matter."""
        video = batch["video"].to(self.ctx.device)
        latent = model.autoencoder.latent_shape(*video.shape[2:])
        noise = draws.per_sample("posterior", rows, lambda g: torch.randn(
            (1, *latent), generator=g, device=g.device))
        reconstruction, mean, logvar = model(video, noise.to(video.device))
        # this rank's losses are means over its rows: scaled, their gradients are the
        # global batch's rows, and summing squares over replicas gives the global norms
        scale = (rows.stop - rows.start) / global_batch

        def sum_squares(squares: torch.Tensor) -> torch.Tensor:
            return self.ctx.sum_over_dp(squares * scale ** 2)

        return tae_loss(video, reconstruction, mean, logvar, self.cfg.recipe.loss, step,
                        model.discriminator, sum_squares)

    def tokens(self, batch: dict[str, Any]) -> int:
        """Latent positions (T'·H'·W') in this rank's batch."""
        batch_size, _, frames, height, width = batch["video"].shape
        return batch_size * math.prod(self.latent_shape_of(frames, height, width)[1:])

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, video: torch.Tensor) -> torch.Tensor:
        """Decode of the posterior mean (zero noise) through the root module, so a sharded
        model gathers its weights as in training: (B, 3, T, H, W) -> same shape."""
        zeros = torch.zeros((video.shape[0], *model.autoencoder.latent_shape(*video.shape[2:])),
                            device=video.device)
        with autocast(self.cfg, video.device):
            reconstruction, _, _ = model(video, zeros)
        return reconstruction.float().clamp(-1, 1)

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """PSNR (dB), SSIM and L1 of the first ``val_batches`` held-out batches, averaged
        over videos; every rank runs the same batches and gets the same numbers."""
        totals = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0}
        count = 0
        for batch in islice(batches, self.cfg.trainer.val_batches):
            video = batch["video"].to(self.ctx.device)
            reconstruction = self.reconstruct(model, video)
            totals["psnr"] += psnr(reconstruction, video).sum().item()
            totals["ssim"] += ssim(reconstruction, video).sum().item()
            totals["l1"] += (reconstruction - video).abs().mean(dim=(1, 2, 3, 4)).sum().item()
            count += video.shape[0]
        return {name: total / count for name, total in totals.items()}

    def show(self, step: int, run_dir: Path, model: nn.Module, monitor) -> None:
        """Inputs and their reconstructions side by side (input left) for the first held-out
        batch, as mp4s in ``<run>/reconstructions/step_N`` and a wandb video panel."""
        if self.val_batches is None:
            return
        batch = next(iter(self.val_batches()))
        video = batch["video"].to(self.ctx.device)
        pairs = torch.cat([video, self.reconstruct(model, video)], dim=-1)
        if monitor.enabled:
            directory = run_dir / "reconstructions" / f"step_{step:08d}"
            paths = write_videos(pairs, batch["caption"], directory, self.cfg.data.fps)
            monitor.log_videos(paths, batch["caption"], step, key="reconstructions")
