"""bench/direction_decision.py's plumbing: the caption edit, and that sampling from a clip
noised to t0 near the data end gives back the clip's own motion whatever the caption
(the noising convention and the time grid after t0 are the bench's own code)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.direction_decision import OPPOSITE, rate, sample_from, with_direction
from data.synthetic import SyntheticVideos
from models.autoencoder import IdentityAutoencoder
from tests.conftest import compose_train
from trainer.build import build_model, single_process


def test_with_direction_replaces_only_the_direction_word():
    assert with_direction("a red square moving left slowly", "right") == \
        "a red square moving right slowly"
    assert with_direction("a cyan triangle moving up quickly", OPPOSITE["up"]) == \
        "a cyan triangle moving down quickly"
    assert rate(["left", "none", "up"], ["left", "left", "up"]) == "66.7%"


def test_a_clip_noised_near_the_data_end_keeps_its_motion_under_either_caption():
    cfg = compose_train(["experiment=t2v_tiny"])
    model = build_model(cfg, single_process(torch.device("cpu"))).eval()
    autoencoder = IdentityAutoencoder(cfg.autoencoder.space_to_depth)
    run = SimpleNamespace(model=model, task=SimpleNamespace(autoencoder=autoencoder))
    data = cfg.data
    val = SyntheticVideos(4, data.frames, data.height, data.width, data.fps, data.seed,
                          split="val")
    specs = [val.spec(i) for i in range(4)]
    x1 = autoencoder.encode(torch.stack([val[i]["video"] for i in range(4)]))
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    t0 = 0.98
    x_t = t0 * x1 + (1 - t0) * x0
    flipped = [with_direction(s.caption, OPPOSITE[s.direction]) for s in specs]
    judged = sample_from(run, x_t, t0, flipped, steps=25, guidance=5.0)
    assert [direction for direction, _ in judged] == [s.direction for s in specs]
    assert [speed for _, speed in judged] == [s.speed for s in specs]
