"""A rank draws only its own rows of the global batch: each sample's caption dropout, t and
noise come from generators keyed by (seed, step, global sample index), so a rank's rows
equal the same rows of a one-process draw and no other sample is ever drawn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainer.draws
from models.flow import FlowMatching
from trainer.draws import StepDraws
from trainer.objective import latent_flow_loss

SHAPE = (8, 3, 2, 4, 4)  # the global batch of latents (B, C, T, H, W)
CAPTIONS = [f"caption {i}" for i in range(SHAPE[0])]


class Recorder(nn.Module):
    """A stand-in model that keeps its inputs and predicts zero velocity."""

    def forward(self, x_t, t, text):
        self.x_t, self.t, self.text = x_t, t, text
        return torch.zeros_like(x_t)


def drawn(rows: slice, x1: torch.Tensor, flow=None, step=3) -> dict:
    """What one rank holding ``rows`` draws and computes (noise, t, dropped captions)."""
    model, kept = Recorder(), []
    latent_flow_loss(model, flow or FlowMatching(noise_offset=0.1), x1[rows], CAPTIONS[rows],
                     StepDraws(7, step), caption_dropout=0.5, rows=rows,
                     on_prediction=lambda x0, *_: kept.append(x0))
    return {"x0": kept[0], "t": model.t, "text": model.text}


@pytest.mark.parametrize("rows", [slice(0, 2), slice(2, 5), slice(7, 8)])
def test_a_ranks_rows_equal_the_same_rows_of_the_one_process_draw(rows):
    x1 = torch.randn(SHAPE)
    one, rank = drawn(slice(0, SHAPE[0]), x1), drawn(rows, x1)
    assert torch.equal(rank["x0"], one["x0"][rows])
    assert torch.equal(rank["t"], one["t"][rows])
    assert rank["text"] == one["text"][rows]
    assert "" in one["text"] and any(one["text"])  # dropout at 0.5 dropped some, kept some


def test_a_rank_never_draws_another_ranks_samples(monkeypatch):
    asked = []
    real = trainer.draws.sample_seed

    def recording(seed, step, index, stream):
        asked.append((index, stream))
        return real(seed, step, index, stream)

    monkeypatch.setattr(trainer.draws, "sample_seed", recording)
    rank = drawn(slice(2, 5), torch.randn(SHAPE))
    assert {index for index, _ in asked} == {2, 3, 4}
    assert {stream for _, stream in asked} == {"caption_dropout", "noise", "t"}
    assert rank["x0"].shape == (3, *SHAPE[1:])  # never a (global batch, ...) tensor


def test_draws_depend_on_step_seed_and_sample():
    x1 = torch.randn(SHAPE)
    base = drawn(slice(0, 8), x1)["x0"]
    assert not torch.equal(base, drawn(slice(0, 8), x1, step=4)["x0"])
    assert not torch.equal(base[0], base[1])  # every sample has its own noise
    assert torch.equal(base, drawn(slice(0, 8), x1)["x0"])  # and a rerun draws it again
    one, other = (StepDraws(seed, 3).per_sample("noise", slice(0, 2),
                                                lambda g: torch.randn(1, 4, generator=g))
                  for seed in (7, 8))
    assert not torch.equal(one, other)
    # streams are independent: the same sample's t and caption dropout differ in value
    draws = StepDraws(7, 3)
    assert not torch.equal(draws.generator(0, "t").get_state(),
                           draws.generator(0, "noise").get_state())


def test_rows_that_do_not_match_the_latents_are_refused():
    with pytest.raises(ValueError, match="do not match the 2 latents"):
        latent_flow_loss(Recorder(), FlowMatching(), torch.randn(2, 3, 2, 4, 4), ["a", "b"],
                         StepDraws(0, 1), rows=slice(0, 3))
    with pytest.raises(ValueError, match="non-empty contiguous"):
        StepDraws(0, 1).per_sample("t", slice(3, 3), lambda g: torch.rand(1, generator=g))
