"""Imagine Flash few-step distillation (Kohler et al., arXiv 2405.05224) on the flow path of
``models/flow.py`` (t = 0 noise, t = 1 data; the noise level of x_t is 1 - t).

A k-step student samples with Euler on its own times t_0 = 0 < t_1 < ... < t_k = 1. One
training sample of backward distillation:

1. draw a step i in [0, k) and pure noise z; run the student, without grad, from z over
   t_0 .. t_i: x_i is where the student itself stands at step i when it samples (never
   data noised forward, which leaks the clean sample into the input);
2. the student's clean estimate x̂ from (x_i, t_i), with grad;
3. the shifted reconstruction target: x̂ noised again with fresh noise e to the shifted
   time tau(t_i), x_tau = interpolate(e, x̂, tau), and the frozen teacher's clean
   estimate from (x_tau, tau) under classifier-free guidance;
4. the loss ||x̂ - target||², the target without grad.

``teacher_trajectory_target`` is a second target, ours, not the paper's: the teacher's own
k'-step guided Euler sample from the student's state (x_i, t_i), so the student learns the
teacher's noise-to-video map from the inputs it meets when it samples (backward
distillation's inputs, a trajectory-matching target).

The shift: the noise level of tau is ``shift`` times the noise level of t,
1 - tau = shift * (1 - t), shift in (0, 1]. At the first step (pure noise) the teacher
sees x̂ under noise level ``shift`` and may move its layout; at later steps less noise
is added and the teacher mostly corrects detail, the paper's "global structure at high
noise, fine detail at low noise".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.flow import FlowMatching
from models.sampler import linear_quadratic_schedule

# (x (B, C, T, H, W), t (B,)) -> velocity (B, C, T, H, W)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_times(steps: int) -> torch.Tensor:
    """(steps + 1,) float64: a k-step student's default schedule, the teacher sampler's own
    linear-quadratic times at k steps (0, 1 for one step), so the student starts as the
    teacher's k-step Euler and trains where it will sample."""
    if steps < 1:
        raise ValueError(f"a student needs at least one step; got {steps}")
    if steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    return linear_quadratic_schedule(steps)


def check_times(times: torch.Tensor) -> None:
    """A student schedule starts at noise (0), ends at data (1) and increases strictly."""
    if times.dim() != 1 or len(times) < 2 or times[0] != 0 or times[-1] != 1 \
            or not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"student times {times.tolist()} must increase strictly from 0 "
                         f"(noise) to 1 (data)")


def shifted_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """tau with noise level 1 - tau = shift * (1 - t): (B,) -> (B,)."""
    return 1 - shift * (1 - t)


@torch.no_grad()
def backward_inputs(student: VelocityFn, noise: torch.Tensor, times: torch.Tensor,
                    step: torch.Tensor, forwards: int | None = None) -> torch.Tensor:
    """The student's own Euler trajectory from ``noise`` (B, C, T, H, W), stopped for each
    sample b at ``times[step[b]]`` (step (B,) long, each in [0, len(times) - 1)). The
    batch runs ``forwards`` (default ``step.max()``; a sharded model needs the same count
    on every rank) batched forwards; a sample keeps its state once it has reached its
    step, so its result does not depend on the steps drawn for its batch neighbours."""
    forwards = int(step.max()) if forwards is None else forwards
    if forwards < int(step.max()):
        raise ValueError(f"{forwards} forwards cannot reach step {int(step.max())}")
    x = noise
    for j in range(forwards):
        t = torch.full((x.shape[0],), float(times[j]), device=x.device)
        advanced = x + float(times[j + 1] - times[j]) * student(x, t).to(x.dtype)
        moving = (step > j).to(x.device).view(-1, *[1] * (x.dim() - 1))
        x = torch.where(moving, advanced, x)
    return x


def guided(velocity: Callable[..., torch.Tensor], scale: float) -> Callable[..., torch.Tensor]:
    """``velocity(x, t, conditional)`` and ``velocity(x, t, unconditional)`` mixed by
    classifier-free guidance, v_u + scale (v_c - v_u), as one function of
    (x, t, both) where ``velocity(x2, t2, both)`` runs the 2B rows [conditional;
    unconditional] in one forward."""
    def mixed(x: torch.Tensor, t: torch.Tensor, both) -> torch.Tensor:
        v_cond, v_uncond = velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)
    return mixed


@torch.no_grad()
def shifted_reconstruction_target(teacher: VelocityFn, flow: FlowMatching,
                                  student_data: torch.Tensor, noise: torch.Tensor,
                                  t: torch.Tensor, shift: float) -> torch.Tensor:
    """The teacher's clean estimate from the student's clean estimate ``student_data``
    (B, C, T, H, W) noised again with fresh ``noise`` (same shape) to
    ``shifted_time(t, shift)``: (B, C, T, H, W), without grad."""
    tau = shifted_time(t, shift)
    x_tau = flow.interpolate(noise, student_data.detach(), tau)
    return flow.predicted_data(x_tau, teacher(x_tau, tau).to(x_tau.dtype), tau)


@torch.no_grad()
def teacher_trajectory_target(teacher: VelocityFn, x: torch.Tensor, t: torch.Tensor,
                              steps: int) -> torch.Tensor:
    """The teacher's own sample from the student's state: Euler from ``x`` (B, C, T, H, W)
    at ``t`` (B,) to data (t = 1) over ``steps`` steps of the linear-quadratic schedule
    rescaled into [t, 1] per sample; (B, C, T, H, W), without grad."""
    fractions = default_times(steps).to(x.device, torch.float32)
    shape = (-1, *[1] * (x.dim() - 1))
    for j in range(steps):
        t_now, t_next = t + (1 - t) * fractions[j], t + (1 - t) * fractions[j + 1]
        x = x + (t_next - t_now).view(shape) * teacher(x, t_now).to(x.dtype)
    return x


def reconstruction_loss(student_data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the student's clean estimate to the teacher's target, a
    scalar in fp32; the gradient flows into ``student_data`` only."""
    return torch.mean((student_data.float() - target.detach().float()) ** 2)
