"""``task=distill``: a few-step student distilled from a trained text-to-video teacher by
Imagine Flash's backward distillation and shifted reconstruction loss (arXiv 2405.05224;
math in models/distill.py, settings in trainer/distill_config.py).

The student is the teacher's model, started from ``trainer.init_from``; the data give
only prompts (a batch's video or latents are never noised: the student's inputs come
from its own trajectory from pure noise). One step, per sample of the global batch: a
student step i in [0, k), pure noise and the re-noising noise, each from the step's
per-sample draws (streams ``student_step``, ``noise``, ``renoise``), so a resumed run
or another mesh draws the same. The no-grad trajectory runs as many forwards as the
largest step drawn in the whole global batch, on every rank alike (a sharded model
needs every rank in each forward).

The teacher is the student's model built again, parallelised by the same path and loaded
from ``trainer.init_from`` (also when the student resumes from a checkpoint of its own),
in eval mode with ``requires_grad`` off, never in the optimizer, the EMA or a checkpoint;
it is built at the first loss, so loading a student to sample never builds it. Its
target uses classifier-free guidance at ``recipe.teacher_guidance`` (conditional and
unconditional rows in one forward); the student learns to give the guided result in
one conditional pass, and samples without guidance.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.contact_sheet import write_contact_sheet
from data.judges import match_rates
from models.distill import (
    backward_inputs,
    guided,
    reconstruction_loss,
    shifted_reconstruction_target,
    teacher_trajectory_target,
)
from parallel.mesh import ParallelContext
from trainer.config import SyntheticDataConfig, TrainConfig
from trainer.distill_config import DistillTarget, check_distill
from trainer.draws import StepDraws
from trainer.objective import Text, null_text_like
from trainer.precision import autocast
from trainer.sampling import Guidance, generate, write_videos
from trainer.t2v_task import TextToVideoTask
from trainer.text_following import held_out_prompts


def text_rows(text: Text) -> int:
    return len(text) if isinstance(text, list) else len(next(iter(text.values()))[0])


def with_unconditional(text: Text, null: Text) -> Text:
    """The text of the 2B rows [conditional; unconditional]."""
    if isinstance(text, list):
        return text + null
    return {name: (torch.cat([states, null[name][0]]), torch.cat([mask, null[name][1]]))
            for name, (states, mask) in text.items()}


class DistillTask(TextToVideoTask):
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        check_distill(cfg)
        super().__init__(cfg, ctx)
        self.recipe = cfg.recipe
        self.times = self.recipe.student_times()
        self.teacher: nn.Module | None = None  # built at the first loss

    def teacher_model(self) -> nn.Module:
        """The frozen teacher: the init_from weights, sharded like the student."""
        if self.teacher is None:
            # imported here: init_from -> trained -> tasks -> this module is a cycle
            from trainer.init_from import frozen_copy

            self.teacher = frozen_copy(self.cfg, self.ctx, "teacher")
        return self.teacher

    def describe(self) -> str:
        recipe = self.recipe
        target = (f"the teacher's {recipe.teacher_steps}-step sample from the student's state"
                  if recipe.target is DistillTarget.teacher_trajectory
                  else f"shifted reconstruction at shift {recipe.shift:g}")
        return (f"{super().describe()}; a {recipe.steps}-step student at times "
                f"{[round(t, 4) for t in self.times.tolist()]}, target: {target}, "
                f"teacher guidance {recipe.teacher_guidance:g}")

    def text_and_shape(self, batch: dict[str, Any]) -> tuple[Text, tuple[int, ...]]:
        """The batch's text input (cached encodings as they are, else the captions) and
        one sample's latent shape (C, T', H', W'); the video is never encoded."""
        if "latent" in batch:
            text = {name: (states.to(self.ctx.device), mask.to(self.ctx.device))
                    for name, (states, mask) in batch["text"].items()}
            return text, tuple(batch["latent"].shape[1:])
        _, _, frames, height, width = batch["video"].shape
        return batch["caption"], tuple(self.autoencoder.latent_shape(frames, height, width))

    def student_steps(self, draws: StepDraws, rows: slice) -> torch.Tensor:
        """(rows,) long: the student step each sample trains, uniform over [0, k)."""
        return draws.per_sample("student_step", rows, lambda g: torch.randint(
            self.recipe.steps, (1,), generator=g, device=g.device)).cpu()

    def loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws,
             rows: slice, global_batch: int, step: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's ``rows`` of the global batch -> (reconstruction loss, no metrics)."""
        forwards = int(self.student_steps(draws, slice(0, global_batch)).max())
        return self.distill_loss(model, batch, draws, rows, forwards), {}

    def distill_loss(self, model: nn.Module, batch: dict[str, Any], draws: StepDraws,
                     rows: slice, forwards: int) -> torch.Tensor:
        text, shape = self.text_and_shape(batch)
        if rows.stop - rows.start != text_rows(text):
            raise ValueError(f"rows {rows} do not match the {text_rows(text)} samples given")
        device, recipe, flow = self.ctx.device, self.recipe, self.flow

        def gaussian(stream: str) -> torch.Tensor:
            return draws.per_sample(stream, rows, lambda g: torch.randn(
                (1, *shape), generator=g, device=g.device)).to(device)

        noise = gaussian("noise")
        steps = self.student_steps(draws, rows)
        x = backward_inputs(lambda x_t, t: model(x_t, t, text), noise, self.times, steps,
                            forwards)
        t = self.times[steps].to(device, torch.float32)
        student_data = flow.predicted_data(x, model(x, t, text), t)
        teacher = self.teacher_model()
        if recipe.teacher_guidance == 1.0:
            def teacher_velocity(x_t, tau):
                return teacher(x_t, tau, text)
        else:
            both = with_unconditional(text, null_text_like(text, self.null_text))
            mixed = guided(teacher, recipe.teacher_guidance)

            def teacher_velocity(x_t, tau):
                return mixed(x_t, tau, both)
        if recipe.target is DistillTarget.teacher_trajectory:
            target = teacher_trajectory_target(teacher_velocity, x, t, recipe.teacher_steps)
        else:
            target = shifted_reconstruction_target(teacher_velocity, flow, student_data,
                                                   gaussian("renoise"), t, recipe.shift)
        return reconstruction_loss(student_data, target)

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """The reconstruction loss on the first ``val_batches`` held-out batches' prompts
        with fixed draws, and with ``data.judge_prompts`` the judges' match rates of the
        student's own k-step samples of held-out captions. Every rank runs the same full
        batches and gets the same numbers."""
        cfg, device = self.cfg, self.ctx.device
        # "step 0" is never a training step: the held-out prompts are its rows, in order
        draws, offset, total = StepDraws(cfg.trainer.seed, 0, device), 0, 0.0
        for batch in islice(batches, cfg.trainer.val_batches):
            size = text_rows(self.text_and_shape(batch)[0])
            rows = slice(offset, offset + size)
            offset = rows.stop
            with autocast(cfg, device):
                total += self.distill_loss(model, batch, draws, rows,
                                           self.recipe.steps - 1).item() * size
        metrics = {"loss": total / offset}
        if isinstance(cfg.data, SyntheticDataConfig) and cfg.data.judge_prompts:
            prompts = held_out_prompts(cfg.data, cfg.data.judge_prompts)
            with autocast(cfg, device):
                videos = self.sample(model, prompts, cfg.trainer.seed)
            rates = match_rates(list(videos.float().cpu()), prompts)
            metrics |= {f"{attribute}_match": rate for attribute, rate in rates.items()}
        return metrics

    def sample(self, model: nn.Module, prompts: list[str], seed: int,
               batch: int = 8) -> torch.Tensor:
        """The student's k-step conditional samples (N, 3, T, H, W), in chunks of
        ``batch``, the chunk that starts at prompt i seeded ``seed + i``."""
        return torch.cat([generate(model, self.autoencoder, prompts[start: start + batch],
                                   self.latent_shape, self.recipe.steps, 1.0, seed + start,
                                   Guidance.none, times=self.times)
                          for start in range(0, len(prompts), batch)])

    def show(self, step: int, run_dir: Path, model: nn.Module, monitor) -> None:
        """The configured prompts sampled by the student on its own k steps."""
        prompts = list(self.cfg.trainer.sample_prompts)
        if not prompts:
            return
        videos = self.sample(model, prompts, self.cfg.trainer.seed)
        if monitor.enabled:
            directory = run_dir / "samples" / f"step_{step:08d}"
            paths = write_videos(videos, prompts, directory, self.cfg.data.fps)
            monitor.log_videos(paths, prompts, step)
            sheet = write_contact_sheet(directory / "contact_sheet.png", videos, prompts)
            monitor.log_image(sheet, f"step {step}: {self.recipe.steps}-step student, one "
                                     f"row per prompt", step)
