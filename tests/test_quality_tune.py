"""Quality tuning: offset noise under flow matching (0 is plain training, bitwise), the
plateau LR cut (at the expected validation, floored, resumed from its state), early
stopping through the real CLI (stops before max_steps, keeps and names the best
checkpoint, resumes bitwise, trains no further once stopped), and the config checks."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from models.flow import FlowMatching
from tests.conftest import compose_train, python_cmd
from tests.test_train_e2e import QUIET, run, train_losses
from trainer.config import ConfigError, EarlyStopConfig, LRSchedule, PlateauConfig, RecipeConfig
from trainer.draws import StepDraws
from trainer.early_stop import EarlyStopping
from trainer.objective import caption_keep_mask, drop_text, latent_flow_loss
from trainer.optim import Scheduler

SHAPE = (4, 3, 2, 4, 4)  # (B, C, T, H, W) latents


class Recorder(nn.Module):
    """A stand-in model: predicts zero velocity and keeps what it was given."""

    def forward(self, x_t, t, text):
        self.x_t, self.t = x_t, t
        return torch.zeros_like(x_t)


class TextAware(nn.Module):
    """A stand-in model whose velocity depends on x_t, t and which captions were dropped."""

    def forward(self, x_t, t, text):
        kept = torch.tensor([float(len(caption)) for caption in text])
        return x_t * t.reshape(-1, 1, 1, 1, 1) + kept.reshape(-1, 1, 1, 1, 1)


class Kept(StepDraws):
    """StepDraws that keeps every generator it hands out, to see what was drawn."""

    def __init__(self, *args):
        super().__init__(*args)
        self.handed: dict[tuple[int, str], torch.Generator] = {}

    def generator(self, index, stream):
        self.handed[index, stream] = super().generator(index, stream)
        return self.handed[index, stream]


ROWS = slice(0, SHAPE[0])


def test_zero_offset_is_plain_training_bitwise_and_draws_nothing_more():
    assert compose_train([]).recipe.noise_offset == 0.0
    model, flow, x1 = TextAware(), FlowMatching(noise_offset=0.0), torch.randn(SHAPE)
    captions = ["a red square moving left slowly", "a blue circle", "a", "b"]
    ours, theirs = Kept(3, 1), StepDraws(3, 1)
    loss = latent_flow_loss(model, flow, x1, captions, ours, caption_dropout=0.5)
    # plain training as it was written before offset noise existed
    text = drop_text(captions, caption_keep_mask(theirs, ROWS, 0.5))
    x0 = theirs.per_sample("noise", ROWS, lambda g: torch.randn(1, *SHAPE[1:], generator=g))
    t = theirs.per_sample("t", ROWS, lambda g: flow.sample_t(1, g))
    plain = flow.loss(model(flow.interpolate(x0, x1, t), t, text), x0, x1)
    assert torch.equal(loss, plain)
    for index in range(SHAPE[0]):  # no extra random number: only eps left each noise stream
        replay = theirs.generator(index, "noise")
        torch.randn(1, *SHAPE[1:], generator=replay)
        assert torch.equal(ours.handed[index, "noise"].get_state(), replay.get_state())
    offset = latent_flow_loss(model, FlowMatching(noise_offset=0.1), x1, captions,
                              StepDraws(3, 1), caption_dropout=0.5)
    assert not torch.equal(offset, plain)


def test_offset_noise_shifts_each_sample_channel_mean_and_enters_path_and_target():
    offset, sigma = 0.1, 1e-5
    flow = FlowMatching(sigma_min=sigma, noise_offset=offset)
    generator, replay = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x0 = flow.noise(SHAPE, generator)
    eps = torch.randn(SHAPE, generator=replay)
    delta = torch.randn((*SHAPE[:2], 1, 1, 1), generator=replay)
    # x0 - eps is one constant per (sample, channel): offset * delta
    assert torch.allclose(x0 - eps, (offset * delta).expand(SHAPE), atol=1e-6)
    # many samples: the spread of per-sample, per-channel means is sqrt(offset² + 1/N)
    big = FlowMatching(noise_offset=offset).noise((1000, 4, 1, 32, 32),
                                                  torch.Generator().manual_seed(1))
    means = big.mean(dim=(2, 3, 4))
    assert means.std().item() == pytest.approx((offset ** 2 + 1 / 1024) ** 0.5, rel=0.05)
    plain = FlowMatching().noise((1000, 4, 1, 32, 32), torch.Generator().manual_seed(1))
    assert plain.mean(dim=(2, 3, 4)).std().item() == pytest.approx(1 / 32, rel=0.05)

    # the loss uses x0 = eps + offset * delta on the unchanged path and target
    model, x1 = Recorder(), torch.randn(SHAPE)
    loss = latent_flow_loss(model, flow, x1, ["a"] * 4, StepDraws(7, 1))
    replay = StepDraws(7, 1)

    def offset_noise(g):
        eps = torch.randn(1, *SHAPE[1:], generator=g)
        return eps + offset * torch.randn((1, SHAPE[1], 1, 1, 1), generator=g)

    x0 = replay.per_sample("noise", ROWS, offset_noise)
    t = replay.per_sample("t", ROWS, lambda g: torch.sigmoid(torch.randn(1, generator=g)))
    tt = t.reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(model.x_t, tt * x1 + (1 - (1 - sigma) * tt) * x0, atol=1e-6)
    assert loss.item() == pytest.approx(torch.mean((x1 - (1 - sigma) * x0) ** 2).item(),
                                        rel=1e-6)
    # a data-parallel rank's rows get the global batch's noise, offsets included
    latent_flow_loss(model, flow, x1[2:], ["a"] * 2, StepDraws(7, 1), rows=slice(2, 4))
    assert torch.allclose(model.x_t, (tt * x1 + (1 - (1 - sigma) * tt) * x0)[2:], atol=1e-6)


def plateau_scheduler(max_steps=100):
    recipe = RecipeConfig(lr=1e-3, schedule=LRSchedule.plateau, warmup_steps=0,
                          plateau=PlateauConfig(patience=2, factor=0.5, min_lr=3e-4))
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=recipe.lr)
    return optimizer, Scheduler(optimizer, recipe, max_steps)


def test_plateau_halves_at_the_expected_validation_down_to_the_floor_and_resumes():
    optimizer, scheduler = plateau_scheduler()
    values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 0.5, 0.6, 0.7]
    cuts, lrs = [], []
    for index, value in enumerate(values, 1):
        for _ in range(3):  # three train steps between validations
            optimizer.step()
            scheduler.step()
        if scheduler.observe(value):
            cuts.append(index)
        lrs.append(optimizer.param_groups[0]["lr"])
        if index == 5:  # checkpoint mid-way, through the trainer state's file format
            buffer = io.BytesIO()
            torch.save(scheduler.state_dict(), buffer)
            buffer.seek(0)
            state = torch.load(buffer, weights_only=True)
    # 2 bad validations in a row cut: the 4th (0.95, 0.96 after 0.9) and the 6th; the 8th
    # would go below min_lr=3e-4, which the 6th already reached
    assert cuts == [4, 6]
    assert lrs == pytest.approx([1e-3] * 3 + [5e-4] * 2 + [3e-4] * 6, rel=1e-12)
    assert scheduler.get_last_lr()[0] == lrs[-1]

    resumed_optimizer, resumed = plateau_scheduler()
    resumed.load_state_dict(state)
    resumed_optimizer.param_groups[0]["lr"] = lrs[4]  # the optimizer's state carries it
    later = []
    for value in values[5:]:
        for _ in range(3):
            resumed_optimizer.step()
            resumed.step()
        later.append((resumed.observe(value), resumed_optimizer.param_groups[0]["lr"]))
    assert later == [(i + 6 in cuts, lr) for i, lr in enumerate(lrs[5:])]


def test_early_stopping_counts_validations_without_improvement():
    stopper = EarlyStopping(EarlyStopConfig(patience=2, min_delta=0.01))
    decisions = [(stopper.observe(step, value), stopper.stopped)
                 for step, value in [(10, 1.0), (20, 0.995), (30, 0.9), (40, 0.895)]]
    # 0.995 and 0.895 improve by less than 1%: not improvements
    assert decisions == [(True, False), (False, False), (True, False), (False, False)]
    assert stopper.observe(50, float("nan")) is False and stopper.stopped
    assert (stopper.best_step, stopper.keep_steps()) == (30, {30})


@pytest.mark.parametrize("overrides, message", [
    (["recipe=quality_tune", "trainer.max_steps=20000"],
     "trainer.max_steps=20000 exceeds the recipe's hard cap recipe.step_cap=15000"),
    (["recipe.schedule=plateau", "recipe.lr=1e-5", "recipe.plateau.min_lr=1e-4"],
     "recipe.plateau.min_lr=0.0001 exceeds recipe.lr=1e-05"),
    (["recipe.plateau.factor=1.5"], "recipe.plateau.factor=1.5 must lie in (0, 1)"),
    (["recipe.noise_offset=-0.1"], "recipe.noise_offset=-0.1 must be a finite number >= 0"),
    (["recipe.early_stop.patience=-1"], "recipe.early_stop.patience=-1"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose_train(overrides)


# The model cannot improve at LR 1e-8: every validation after the first is "no better by
# 1e-4 relative". With val_every=2: step 2 is the best; 4 and 6 cut the LR (patience 1)
# to the floor; the third bad validation, at step 8, stops the run.
STOPPING = ["model.depth=1", "model.width=64", "model.heads=4", "model.ffn_dim=128",
            "text.encoders.byte.dim=64", "text.encoders.byte.depth=1",
            "text.encoders.byte.ffn_dim=128", "model=dit_tiny", "data.frames=4", "data.height=16",
            "data.width=16", "data.val_samples=8", "recipe=quality_tune",
            "recipe.batch_size=4", "recipe.lr=1e-8", "recipe.warmup_steps=0",
            "recipe.schedule=plateau", "recipe.plateau.patience=1",
            "recipe.plateau.min_lr=2.5e-9", "recipe.plateau.threshold=1e-4",
            "recipe.early_stop.patience=3", "recipe.early_stop.min_delta=1e-4",
            "recipe.val_metric=loss", "trainer.val_every=2", "trainer.val_batches=2",
            "trainer.ckpt_every=5", "trainer.keep_last=1", "data.judge_prompts=0",
            "trainer.progress=false", *QUIET]


def stopping_cmd(run_dir, max_steps):
    return python_cmd("trainer.train", f"hydra.run.dir={run_dir}", *STOPPING,
                      f"trainer.max_steps={max_steps}")


def records(run_dir, kind):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == kind]


def test_early_stop_cli_keeps_the_best_resumes_bitwise_and_stays_stopped(tmp_path):
    from trainer.trained import locate_checkpoint

    whole, split = tmp_path / "whole", tmp_path / "split"
    result = run(stopping_cmd(whole, 30))
    assert "early stop" in result.stdout
    assert sorted(train_losses(whole)) == list(range(1, 9))  # stopped at 8 of 30
    lrs = {r["step"]: r["lr"] for r in records(whole, "train")}
    assert lrs == pytest.approx({**dict.fromkeys(range(1, 5), 1e-8),
                                 **dict.fromkeys((5, 6), 5e-9), 7: 2.5e-9, 8: 2.5e-9})
    assert [r["step"] for r in records(whole, "lr_cut")] == [4, 6]
    assert [r["step"] for r in records(whole, "early_stop")] == [8]
    # the best (step 2) survives keep_last=1; step 8 records the stop
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000008"]
    best = json.loads((whole / "best.json").read_text())
    assert (best["step"], best["checkpoint"]) == (2, "checkpoints/step_00000002")
    assert locate_checkpoint(whole)[1] == whole / "checkpoints" / "step_00000002"

    run(stopping_cmd(split, 6))  # a stop at step 6 (a validation step in both runs)
    result = run(stopping_cmd(split, 30))
    assert "resumed from" in result.stdout
    assert train_losses(split) == train_losses(whole)  # exact floats, every step
    assert {r["step"]: r["lr"] for r in records(split, "train")} == lrs
    assert [r["step"] for r in records(split, "lr_cut")] == [4, 6]

    lines = (split / "metrics.jsonl").read_text()
    result = run(stopping_cmd(split, 30))
    assert "stopped early at step 8" in result.stdout
    assert (split / "metrics.jsonl").read_text() == lines  # nothing trained


def test_watching_validation_needs_held_out_data():
    with pytest.raises(ConfigError, match="recipe.early_stop.patience=2 watch the validation "
                                          "loss, but this run has no held-out data"):
        compose_train(["recipe.early_stop.patience=2", "data.val_samples=0"])
    with pytest.raises(ConfigError, match="recipe.schedule=plateau watch"):
        compose_train(["data=webdataset", "recipe.schedule=plateau", "recipe.lr=1e-3"])
