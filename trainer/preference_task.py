"""``recipe=preference``: the text-to-video task trained on preference pairs with SimPO or
Diffusion-DPO (math in models/preference.py). Model, sampling and everything the loop
does are the text-to-video task's; only the loss and validation differ.

One step: each pair draws caption dropout, noise x0 and t once, from the same per-sample
streams as ``latent_flow_loss`` (so the preferred side sees exactly the draws plain
training would give that sample), and both sides use them. The two sides run through the
model as one batch of 2B rows [preferred; rejected], so a mesh gathers and shards once.
With ``loss=dpo`` a frozen reference runs the same 2B rows without grad. SimPO's pixel
term decodes the same window of both sides (one draw per pair).

The reference is the policy's model built again, parallelised by the same path (FSDP2,
TP, CP) and loaded from ``trainer.init_from`` (also when the policy resumes from a
checkpoint of its own), in eval mode with ``requires_grad`` off: it is never in the
optimizer, the EMA or a checkpoint. It is built at the first loss, not with the policy:
a run loaded to sample from (trainer.sample) never builds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from models.dit import patch_grid
from models.preference import (
    beta_t,
    implicit_accuracy,
    per_sample_error,
    preference_loss,
    reward_margin,
)
from parallel.mesh import ParallelContext
from trainer.config import TrainConfig
from trainer.draws import StepDraws
from trainer.objective import Text, caption_keep_mask, draw_noise_and_t, drop_text
from trainer.precision import autocast
from trainer.preference_config import PreferenceLoss, check_preference
from trainer.t2v_task import TextToVideoTask

SIDES = ("win", "lose")


def both_sides(text: Text) -> Text:
    """A batch's text for the 2B rows [preferred; rejected]."""
    if isinstance(text, list):
        return text + text
    return {name: (torch.cat([states, states]), torch.cat([mask, mask]))
            for name, (states, mask) in text.items()}


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) rows [preferred; rejected] -> (preferred, rejected)."""
    return x[: x.shape[0] // 2], x[x.shape[0] // 2:]


class PreferenceTask(TextToVideoTask):
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        check_preference(cfg)
        super().__init__(cfg, ctx)
        self.recipe = cfg.recipe
        self.reference: nn.Module | None = None  # built at the first DPO loss

    def reference_model(self) -> nn.Module:
        """The frozen reference: the init_from weights, sharded like the policy."""
        if self.reference is None:
            # imported here: init_from -> trained -> tasks -> this module is a cycle
            from trainer.init_from import frozen_copy

            self.reference = frozen_copy(self.cfg, self.ctx, "reference model")
        return self.reference

    def describe(self) -> str:
        reference = (", a frozen reference forward per step"
                     if self.recipe.loss is PreferenceLoss.dpo else "")
        return f"{super().describe()}, two per pair ({self.recipe.loss.value}{reference})"

    @torch.no_grad()
    def pairs_and_text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Text]:
        """x1 (2B, C, T', H', W') rows [preferred; rejected] and the B pairs' text input
        (cached encodings as they are, else the captions)."""
        device = self.ctx.device
        if "latent_win" in batch:
            latents = [batch[f"latent_{side}"].to(device) for side in SIDES]
            text = {name: (states.to(device), mask.to(device))
                    for name, (states, mask) in batch["text"].items()}
            return torch.cat(latents), text
        video = torch.cat([batch[f"video_{side}"] for side in SIDES]).to(device)
        return self.autoencoder.encode(video), batch["caption"]

    def tokens(self, batch: dict[str, Any]) -> int:
        """Video tokens in this rank's batch: both sides of every pair."""
        if "latent_win" in batch:
            pairs, *latent = batch["latent_win"].shape
        else:
            pairs, _, frames, height, width = batch["video_win"].shape
            latent = self.autoencoder.latent_shape(frames, height, width)
        return 2 * pairs * math.prod(patch_grid(self.cfg.model, latent))

    def loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws,
             rows: slice, global_batch: int, step: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's ``rows`` of the global batch of pairs -> (loss, metrics)."""
        return self.pair_loss(model, batch, draws, rows, self.recipe.caption_dropout)

    def pair_loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws,
                  rows: slice, caption_dropout: float
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The preference loss of the pairs ``rows`` and its metrics: implicit accuracy,
        reward margin, the model's (and the reference's) errors on each side and, with
        SimPO's pixel term, the latent and pixel losses and pixel errors."""
        flow, recipe = self.flow, self.recipe
        x1, text = self.pairs_and_text(batch)
        if rows.stop - rows.start != x1.shape[0] // 2:
            raise ValueError(f"rows {rows} do not match the {x1.shape[0] // 2} pairs given")
        text = both_sides(drop_text(text, caption_keep_mask(draws, rows, caption_dropout),
                                    self.null_text))
        x0, t = draw_noise_and_t(flow, draws, rows, x1[: x1.shape[0] // 2])
        x0, t2 = torch.cat([x0, x0]), torch.cat([t, t])
        x_t, target = flow.interpolate(x0, x1, t2), flow.target(x0, x1)
        velocity = model(x_t, t2, text)
        error_win, error_lose = halves(per_sample_error(velocity, target))
        beta = beta_t(recipe.beta, t, recipe.beta_schedule.value)
        metrics = {"error_win": error_win.mean().detach(),
                   "error_lose": error_lose.mean().detach()}
        references = ()
        if recipe.loss is PreferenceLoss.dpo:
            with torch.no_grad():
                references = halves(per_sample_error(self.reference_model()(x_t, t2, text),
                                                     target))
            metrics |= {"reference_error_win": references[0].mean(),
                        "reference_error_lose": references[1].mean()}
        margin = reward_margin(error_win, error_lose, beta, *references)
        loss = preference_loss(margin, recipe.margin)
        metrics |= {"implicit_accuracy": implicit_accuracy(margin.detach()),
                    "reward_margin": margin.detach().mean()}
        if self.pixel_loss is None:
            return loss, metrics
        starts = self.pixel_loss.draw_starts(draws, rows, tuple(x1.shape[2:]))
        pixel_win, pixel_lose = halves(self.pixel_loss.errors(
            x0, x1, t2, velocity, torch.cat([starts, starts])))
        pixel = preference_loss(reward_margin(pixel_win, pixel_lose, beta), recipe.margin)
        metrics |= {"latent_loss": loss.detach(), "pixel_loss": pixel.detach(),
                    "pixel_error_win": pixel_win.mean().detach(),
                    "pixel_error_lose": pixel_lose.mean().detach()}
        return loss + self.pixel_loss.cfg.weight * pixel, metrics

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """The preference loss and metrics on the first ``val_batches`` held-out batches of
        pairs, with fixed draws and no caption dropout, as means over pairs. Every rank
        runs the same full batches and gets the same numbers."""
        cfg, device = self.cfg, self.ctx.device
        # "step 0" is never a training step: the held-out pairs are its rows, in order
        draws, offset, sums = StepDraws(cfg.trainer.seed, 0, device), 0, {}
        for batch in islice(batches, cfg.trainer.val_batches):
            pairs = len(batch["caption"])
            rows = slice(offset, offset + pairs)
            offset = rows.stop
            with autocast(cfg, device):
                loss, metrics = self.pair_loss(model, batch, draws, rows, caption_dropout=0.0)
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value.item() * pairs
        return {name: total / offset for name, total in sums.items()}
