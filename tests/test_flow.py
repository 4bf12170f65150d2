import pytest
import torch

from models.flow import FlowMatching
from models.sampler import GuidedVelocity, euler_sample, linear_quadratic_schedule


def test_path_endpoints_and_target():
    flow = FlowMatching(sigma_min=1e-5)
    x0, x1 = torch.randn(4, 3, 2, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, 2,
                                                                         dtype=torch.float64)
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.zeros(4)), x0)
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.ones(4)), x1 + 1e-5 * x0)
    t = torch.rand(4, dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(flow.interpolate(x0, x1, t), tt * x1 + (1 - (1 - 1e-5) * tt) * x0)
    # the target is the time derivative of the path
    eps = 1e-6
    derivative = (flow.interpolate(x0, x1, t + eps) - flow.interpolate(x0, x1, t - eps)) / (2 * eps)
    torch.testing.assert_close(derivative, flow.target(x0, x1))


def test_training_t_is_logit_normal():
    t = FlowMatching().sample_t(200_000, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01


def test_loss_is_zero_for_the_exact_velocity():
    flow = FlowMatching()
    x0, x1 = torch.randn(2, 3), torch.randn(2, 3)
    assert flow.loss(flow.target(x0, x1), x0, x1) == 0
    assert flow.loss(flow.target(x0, x1) + 1, x0, x1) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [2, 10, 50, 51, 250])
def test_linear_quadratic_schedule(n):
    t = linear_quadratic_schedule(n)
    assert t.shape == (n + 1,)
    assert t[0] == 0 and t[-1] == pytest.approx(1.0, abs=1e-12)
    assert torch.all(t[1:] > t[:-1])
    lin = n // 2
    assert t[lin] == pytest.approx(0.025, abs=1e-12)
    torch.testing.assert_close(t[: lin + 1], torch.linspace(0, 0.025, lin + 1, dtype=t.dtype))
    if n >= 4:  # quadratic tail: constant second differences
        second = t[lin + 2:] - 2 * t[lin + 1:-1] + t[lin:-2]
        torch.testing.assert_close(second, torch.full_like(second, second[0].item()))


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps >= 2"):
        linear_quadratic_schedule(1)
    with pytest.raises(ValueError, match="threshold=1.5"):
        linear_quadratic_schedule(10, threshold=1.5)


def test_euler_integrates_constant_velocity_exactly():
    x0, velocity = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    out = euler_sample(lambda x, t: velocity, x0, linear_quadratic_schedule(7))
    torch.testing.assert_close(out, x0 + velocity, rtol=1e-12, atol=1e-12)


def test_euler_on_the_ideal_flow_of_one_point_lands_on_it():
    # For a single data point x1 the exact velocity field is linear in x; its straight
    # trajectories make Euler exact on any schedule.
    flow = FlowMatching(sigma_min=1e-5)
    x1 = torch.randn(2, 5, dtype=torch.float64)
    s = 1 - flow.sigma_min

    def ideal(x, t):
        tt = t.view(-1, 1).to(x.dtype)
        return (x1 - s * x) / (1 - s * tt)

    noise = torch.randn(2, 5, dtype=torch.float64)
    out = euler_sample(ideal, noise, linear_quadratic_schedule(20))
    torch.testing.assert_close(out, flow.interpolate(noise, x1, torch.ones(2, dtype=torch.float64)))


def test_classifier_free_guidance_mix():
    def model(x, t, context, mask):
        return context.sum(dim=(1, 2)).view(-1, 1) * torch.ones_like(x)

    ctx, null = torch.full((2, 3, 4), 1.0), torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    v = GuidedVelocity(model, ctx, mask, null, mask, scale=7.5)(torch.zeros(2, 1), torch.zeros(2))
    torch.testing.assert_close(v, torch.full((2, 1), 7.5 * 12.0))
    plain = GuidedVelocity(model, ctx, mask, null, mask, scale=1.0)(torch.zeros(2, 1),
                                                                   torch.zeros(2))
    torch.testing.assert_close(plain, torch.full((2, 1), 12.0))
