"""bench/restoration.py's plumbing: a model that restores every noised clip exactly is
credited with every shape at every t, one that restores a black frame with none, and the
per-shape totals are the captions' own."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.restoration import restored_shapes
from data.judges import caption_judgement
from data.synthetic import SHAPES
from models.autoencoder import IdentityAutoencoder
from models.flow import FlowMatching
from tests.conftest import compose_train
from trainer.evaluate import held_out_clips
from trainer.text_following import held_out_prompts

CLIPS = 12


def _run(cfg, autoencoder, restore):
    """A stand-in run whose DiT returns the velocity that makes its clean-clip estimate
    ``restore(x_t, t)``, under the run's own flow."""
    flow = FlowMatching(sigma_min=cfg.recipe.sigma_min)
    c = 1 - flow.sigma_min

    def dit(x_t, t, context, mask):
        t = t.view(-1, *(1,) * (x_t.dim() - 1))
        return (restore(x_t, t) - c * x_t) / (1 - c * t)

    def text(captions):
        return torch.zeros(len(captions), 1, 4), torch.ones(len(captions), 1)

    return SimpleNamespace(cfg=cfg, model=SimpleNamespace(dit=dit, text=text),
                           task=SimpleNamespace(autoencoder=autoencoder))


def test_restoration_probe_credits_exact_restorations_and_nothing_else():
    cfg = compose_train(["experiment=t2v_tiny"])
    wanted = [caption_judgement(caption).shape for caption in held_out_prompts(cfg.data, CLIPS)]
    totals = {shape: wanted.count(shape) for shape in SHAPES}
    autoencoder = IdentityAutoencoder(cfg.autoencoder.space_to_depth)
    clean = autoencoder.encode(held_out_clips(cfg.data, CLIPS))
    exact = _run(cfg, autoencoder, lambda x_t, t: clean)
    table = restored_shapes(exact, CLIPS, [0.3, 0.9], batch=CLIPS)
    assert table == {t: {shape: (totals[shape], totals[shape]) for shape in SHAPES}
                     for t in (0.3, 0.9)}
    black = _run(cfg, autoencoder, lambda x_t, t: torch.full_like(x_t, -1.0))
    assert restored_shapes(black, CLIPS, [0.9], batch=4) == \
        {0.9: {shape: (0, totals[shape]) for shape in SHAPES}}
    assert sum(totals.values()) == CLIPS and min(totals.values()) > 0
