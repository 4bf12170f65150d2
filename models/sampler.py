"""Euler sampling of the flow ODE with Movie Gen's linear-quadratic schedule (arXiv 2410.13720 §2).

The schedule is returned as data fractions t_0 = 0 (noise) < ... < t_N = 1 (data); the
noise level is 1 - t. Classifier-free guidance mixes conditional and unconditional
velocities, v = v_u + scale * (v_c - v_u), in one batched forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_quadratic_schedule(num_steps: int, threshold: float = 0.025,
                              linear_steps: int | None = None) -> torch.Tensor:
    """(num_steps + 1,) float64 times: linear up to ``threshold`` over the first
    ``linear_steps`` (default N/2) steps, then quadratic to 1."""
    n = num_steps
    lin = n // 2 if linear_steps is None else linear_steps
    if n < 2 or not 0 < lin < n:
        raise ValueError(f"linear-quadratic schedule needs num_steps >= 2 and "
                         f"0 < linear_steps < num_steps; got {n} and {lin}")
    if not 0 < threshold < 1:
        raise ValueError(f"schedule threshold={threshold} must lie in (0, 1)")
    q = n - lin
    d = lin - threshold * n
    a = d / (lin * q * q)
    b = threshold / lin - 2 * d / (q * q)
    c = a * lin * lin
    i = torch.arange(n + 1, dtype=torch.float64)
    return torch.where(i < lin, i * threshold / lin, a * i * i + b * i + c)


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from times[0] to times[-1] starting at ``noise``."""
    x = noise
    for t_now, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        t_batch = torch.full((x.shape[0],), t_now, device=x.device)
        x = x + (t_next - t_now) * velocity(x, t_batch).to(x.dtype)
    return x


def guided_velocity(model: Callable[..., torch.Tensor], context: torch.Tensor,
                    context_mask: torch.Tensor, null_context: torch.Tensor,
                    null_mask: torch.Tensor, scale: float) -> VelocityFn:
    """Classifier-free guidance around ``model(x, t, context, mask)``; scale 1 is unguided."""
    if scale == 1.0:
        return lambda x, t: model(x, t, context, context_mask)
    both_context = torch.cat([context, null_context])
    both_mask = torch.cat([context_mask, null_mask])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                                 both_context, both_mask).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity
