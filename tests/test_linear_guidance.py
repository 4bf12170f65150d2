"""LinearAG: the least-squares fit recovers known coefficients, the sampler predicts the
unconditional velocity on every other step exactly as written out by hand, and a
calibration file that is missing, corrupt, for other steps or for other weights is
refused, naming it."""

import json
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from models.sampler import (
    GuidedVelocity,
    LinearGuidanceFit,
    alternate_steps,
    euler_sample,
    linear_quadratic_schedule,
)
from tests.test_adaptive_guidance import PROMPTS, SCALE, STEPS, sample, setup  # noqa: F401
from trainer.config import ConfigError
from trainer.linear_guidance import calibrate, calibration_path, load_coefficients


@contextmanager
def nudged(model):
    """``model`` with its first parameter's first row moved by 1e-3 (a stale calibration's
    weights), restored afterwards."""
    parameter = next(model.parameters())
    kept = parameter.detach().clone()
    with torch.no_grad():
        parameter[0] += 1e-3
    try:
        yield model
    finally:
        with torch.no_grad():
            parameter.copy_(kept)


def test_the_fit_recovers_the_coefficients_that_made_the_data():
    steps, truth = 6, {1: (0.3, 0.5, 0.1), 3: (-0.2, 1.1, 0.4), 5: (0.7, 0.0, -0.3)}
    fit = LinearGuidanceFit(steps, alternate_steps(steps))
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # two calibration batches
        previous = None
        for step in range(steps):
            v_cond = torch.randn(3, 4, 2, 2, generator=generator)
            if step in truth:
                a, b, c = truth[step]
                v_uncond = a * v_cond + b * previous[0] + c * previous[1]
            else:
                v_uncond = torch.randn(3, 4, 2, 2, generator=generator)
            fit.observe(step, v_cond, v_uncond)
            previous = (v_cond, v_uncond)
    rows, error = fit.coefficients()
    for step in range(steps):
        if step in truth:
            torch.testing.assert_close(rows[step], torch.tensor(truth[step], dtype=torch.float64),
                                       rtol=0, atol=1e-6)
            assert error[step] < 1e-10
        else:
            assert rows[step].isnan().all() and error[step].isnan()


def coefficients_for(steps):
    rows = torch.full((steps, 3), float("nan"), dtype=torch.float64)
    for step in alternate_steps(steps):
        rows[step] = torch.tensor([0.8, 0.3, -0.1]) + 0.01 * step
    return rows


def test_linear_ag_predicts_every_other_unconditional_pass_as_written_by_hand(setup):  # noqa: F811
    model, _, _, (context, mask, null_context, null_mask), noise = setup
    rows = coefficients_for(STEPS)
    velocity = GuidedVelocity(model.dit, context[:1], mask[:1], null_context[:1], null_mask[:1],
                              SCALE, "linear_ag", 1.5, rows)
    times = linear_quadratic_schedule(STEPS)
    out = euler_sample(velocity, noise[:1], times)
    trace = velocity.trace()
    assert trace.nfe.tolist() == [STEPS + (STEPS + 1) // 2]  # 4 evaluated, 4 predicted
    assert trace.cosine[0::2, 0].isfinite().all() and trace.cosine[1::2, 0].isnan().all()

    x, previous, times = noise[:1], None, times.tolist()
    with torch.no_grad():
        for step, (t_now, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
            t = torch.full((1,), t_now)
            if step % 2 == 0:
                v_cond, v_uncond = model.dit(torch.cat([x, x]), torch.cat([t, t]),
                                             torch.cat([context[:1], null_context[:1]]),
                                             torch.cat([mask[:1], null_mask[:1]])).chunk(2)
            else:
                a, b, c = rows[step].tolist()
                v_cond = model.dit(x, t, context[:1], mask[:1])
                v_uncond = a * v_cond + b * previous[0] + c * previous[1]
            previous = (v_cond, v_uncond)
            x = x + (t_next - t_now) * (v_uncond + SCALE * (v_cond - v_uncond))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_linear_ag_without_predicted_steps_is_adaptive_and_switches_like_it(setup):  # noqa: F811
    nan_rows = torch.full((STEPS, 3), float("nan"), dtype=torch.float64)
    for threshold in (1.5, -1.0):
        adaptive, adaptive_trace = sample(setup, "adaptive", threshold)
        model, _, _, text, noise = setup
        velocity = GuidedVelocity(model.dit, *text, SCALE, "linear_ag", threshold, nan_rows)
        assert torch.equal(euler_sample(velocity, noise, linear_quadratic_schedule(STEPS)),
                           adaptive)
        assert torch.equal(velocity.trace().nfe, adaptive_trace.nfe)


@pytest.fixture
def calibrated(setup, tmp_path):  # noqa: F811
    model, _, latent_shape, _, _ = setup
    run = SimpleNamespace(model=model, task=SimpleNamespace(latent_shape=latent_shape),
                          run_dir=tmp_path, step=7)
    record = calibrate(run, STEPS, SCALE, PROMPTS, seed=0, batch=1)
    path = calibration_path(tmp_path, STEPS, SCALE)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return model, path, record


def test_a_calibration_file_round_trips_and_bad_ones_are_refused(calibrated):
    model, path, record = calibrated
    rows = load_coefficients(path, model, STEPS, SCALE)
    assert rows.shape == (STEPS, 3) and rows[alternate_steps(STEPS)].isfinite().all()
    assert rows[0::2].isnan().all()
    assert all(0 <= e < 1 for e in record["relative_error"] if e is not None)

    with pytest.raises(ConfigError, match=r"fitted for steps=8 scale=5, not steps=6"):
        load_coefficients(path, model, 6, SCALE)
    with pytest.raises(ConfigError, match=f"{path.parent / 'missing.json'}.*missing.*"
                                          r"trainer.linear_guidance"):
        load_coefficients(path.parent / "missing.json", model, STEPS, SCALE)
    path.write_text('{"format": "cinetron-linear-ag/1", "coeffi')
    with pytest.raises(ConfigError, match=f"{path} is corrupt"):
        load_coefficients(path, model, STEPS, SCALE)
    path.write_text(json.dumps(record | {"coefficients": record["coefficients"][:3]}))
    with pytest.raises(ConfigError, match=f"{path} is corrupt"):
        load_coefficients(path, model, STEPS, SCALE)
    path.write_text(json.dumps(record))
    with nudged(model), pytest.raises(ConfigError, match=f"{path} is stale"):
        load_coefficients(path, model, STEPS, SCALE)
