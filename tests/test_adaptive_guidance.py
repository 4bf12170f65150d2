"""Adaptive Guidance (arXiv 2312.12487) in ``models.sampler.GuidedVelocity`` on a tiny
random DiT: thresholds that never or always pass give CFG or conditional-only exactly,
a switch midway matches the sampler written out by hand, and NFE counts are exact."""

import pytest
import torch

from models.sampler import GuidedVelocity, euler_sample, linear_quadratic_schedule
from tests.conftest import compose_train
from trainer.build import build_autoencoder, build_model, single_process
from trainer.sampling import generate_traced

SMALL = ["model.depth=2", "model.width=32", "model.heads=2", "model.ffn_dim=64",
         "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
         "text.encoders.byte.ffn_dim=64", "model=dit_tiny", "data.frames=2",
         "data.height=8", "data.width=8"]
STEPS, SCALE = 8, 5.0
PROMPTS = ["a red square moving left", "a blue circle moving up quickly"]


@pytest.fixture(scope="module")
def setup():
    """A tiny DiT with every weight nudged off its init (adaLN-zero would make every
    velocity zero), its text encodings and a fixed noise."""
    cfg = compose_train(SMALL)
    model = build_model(cfg, single_process(torch.device("cpu")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.eval()
    autoencoder = build_autoencoder(cfg, torch.device("cpu"))
    latent_shape = autoencoder.latent_shape(2, 8, 8)
    with torch.no_grad():
        context, mask = model.text(PROMPTS)
        null_context, null_mask = model.text([""] * len(PROMPTS))
    noise = torch.randn((len(PROMPTS), *latent_shape), generator=generator)
    return model, autoencoder, latent_shape, (context, mask, null_context, null_mask), noise


def sample(setup, mode, threshold=0.99, rows=slice(None), scale=SCALE):
    model, _, _, (context, mask, null_context, null_mask), noise = setup
    velocity = GuidedVelocity(model.dit, context[rows], mask[rows], null_context[rows],
                              null_mask[rows], scale, mode, threshold)
    return euler_sample(velocity, noise[rows], linear_quadratic_schedule(STEPS)), \
        velocity.trace()


@pytest.mark.parametrize("threshold", [1.0, 1.5])
def test_a_threshold_never_passed_is_cfg_bitwise(setup, threshold):
    cfg, cfg_trace = sample(setup, "cfg")
    adaptive, trace = sample(setup, "adaptive", threshold)
    assert torch.equal(adaptive, cfg)
    assert trace.nfe.tolist() == [2 * STEPS] * 2 and trace.switch_step.tolist() == [-1, -1]
    assert torch.equal(trace.cosine, cfg_trace.cosine)
    assert trace.cosine.shape == (STEPS, 2) and not trace.cosine.isnan().any()


def test_a_threshold_below_minus_one_is_conditional_only(setup):
    conditional, plain = sample(setup, "none")
    adaptive, trace = sample(setup, "adaptive", -1.5)
    assert torch.equal(adaptive, conditional)
    assert trace.nfe.tolist() == [STEPS] * 2 == plain.nfe.tolist()
    assert trace.switch_step.tolist() == [0, 0] and trace.cosine.isnan().all()


def by_hand(setup, switch_step, row):
    """Euler with CFG on steps < switch_step and the conditional velocity after, for one
    prompt, each forward written out."""
    model, _, _, (context, mask, null_context, null_mask), noise = setup
    rows = slice(row, row + 1)
    x, times = noise[rows], linear_quadratic_schedule(STEPS).tolist()
    with torch.no_grad():
        for step, (t_now, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
            t = torch.full((1,), t_now)
            if step < switch_step:
                v_cond, v_uncond = model.dit(
                    torch.cat([x, x]), torch.cat([t, t]),
                    torch.cat([context[rows], null_context[rows]]),
                    torch.cat([mask[rows], null_mask[rows]])).chunk(2)
                velocity = v_uncond + SCALE * (v_cond - v_uncond)
            else:
                velocity = model.dit(x, t, context[rows], mask[rows])
            x = x + (t_next - t_now) * velocity
    return x


def test_minus_one_switches_after_the_first_step(setup):
    adaptive, trace = sample(setup, "adaptive", -1.0, slice(0, 1))
    assert trace.switch_step.tolist() == [1] and trace.nfe.tolist() == [STEPS + 1]
    assert torch.equal(adaptive, by_hand(setup, 1, 0))


def record_steps(cosines):
    """Steps >= 1 whose cosine exceeds every earlier step's: where a threshold just
    under it makes the sampler switch."""
    return [s for s in range(1, len(cosines)) if cosines[s] > cosines[:s].max()]


def test_a_switch_midway_matches_the_hand_computation(setup):
    _, cfg_trace = sample(setup, "cfg", rows=slice(0, 1))
    cosines = cfg_trace.cosine[:, 0]
    records = record_steps(cosines)
    step = min(records, key=lambda s: abs(s - STEPS // 2))
    assert 0 < step < STEPS - 1, f"no record cosine midway: {cosines.tolist()}"
    threshold = float((cosines[:step].max() + cosines[step]) / 2)
    adaptive, trace = sample(setup, "adaptive", threshold, slice(0, 1))
    # the crossing step still uses its guided velocity: conditional only from step + 1
    assert trace.switch_step.tolist() == [step + 1]
    assert trace.nfe.tolist() == [STEPS + step + 1]
    assert torch.equal(adaptive, by_hand(setup, step + 1, 0))
    assert trace.cosine[: step + 1].isfinite().all() and trace.cosine[step + 1:].isnan().all()


def test_samples_of_one_batch_switch_on_their_own(setup):
    """One threshold, two prompts: each switches where it would alone, and its video is
    the one it gets alone (up to the batch size's float rounding)."""
    _, cfg_trace = sample(setup, "cfg")
    alone = [sample(setup, "cfg", rows=slice(i, i + 1))[1].cosine[:, 0] for i in range(2)]
    torch.testing.assert_close(cfg_trace.cosine, torch.stack(alone, 1), rtol=0, atol=1e-6)
    # a threshold that one prompt's cosines cross midway and the other's later or never
    candidates = sorted({float(c) for c in cfg_trace.cosine.flatten()})
    for low, high in zip(candidates, candidates[1:], strict=False):
        threshold = (low + high) / 2
        firsts = [next((s for s in range(STEPS) if cfg_trace.cosine[s, i] > threshold), None)
                  for i in range(2)]
        if firsts[0] != firsts[1] and None not in firsts and max(firsts) < STEPS - 1:
            break
    else:
        pytest.fail(f"no threshold separates the prompts: {cfg_trace.cosine.tolist()}")
    batched, trace = sample(setup, "adaptive", threshold)
    expected_switch = [first + 1 for first in firsts]
    assert trace.switch_step.tolist() == expected_switch
    assert trace.nfe.tolist() == [STEPS + s for s in expected_switch]
    for i in range(2):
        torch.testing.assert_close(batched[i: i + 1], by_hand(setup, expected_switch[i], i),
                                   rtol=1e-5, atol=1e-6)
        single, single_trace = sample(setup, "adaptive", threshold, slice(i, i + 1))
        assert single_trace.switch_step.tolist() == [expected_switch[i]]


@pytest.mark.parametrize("mode", ["none", "cfg", "adaptive"])
def test_scale_one_is_conditional_only_in_every_mode(setup, mode):
    conditional, _ = sample(setup, "none")
    video, trace = sample(setup, mode, 0.99, scale=1.0)
    assert torch.equal(video, conditional) and trace.nfe.tolist() == [STEPS] * 2


def test_generate_traced_reports_the_trace_and_refuses_a_bad_mode(setup):
    model, autoencoder, latent_shape, _, _ = setup
    videos, trace = generate_traced(model, autoencoder, PROMPTS, latent_shape, 3, SCALE,
                                    seed=0, guidance="adaptive", threshold=-1.0)
    assert videos.shape == (2, 3, 2, 8, 8) and trace.nfe.tolist() == [4, 4]
    with pytest.raises(ValueError, match="guidance='fast'"):
        GuidedVelocity(model.dit, *setup[3], SCALE, "fast")
    with pytest.raises(ValueError, match="NaN"):
        GuidedVelocity(model.dit, *setup[3], SCALE, "adaptive", float("nan"))
