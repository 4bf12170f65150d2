"""Euler sampling of the flow ODE with Movie Gen's linear-quadratic schedule (arXiv 2410.13720 §2).

The schedule is returned as data fractions t_0 = 0 (noise) < ... < t_N = 1 (data); the
noise level is 1 - t. Classifier-free guidance mixes conditional and unconditional
velocities, v = v_u + scale * (v_c - v_u), in one batched forward.

Adaptive Guidance (Castillo et al., arXiv 2312.12487) drops a sample's unconditional
pass for the rest of its trajectory once its conditional and unconditional velocities
point the same way (cosine similarity above a threshold): ``GuidedVelocity``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


GUIDANCE_MODES = ("none", "cfg", "adaptive", "linear_ag")
# (step, v_cond (N, ...), v_uncond (N, ...)) of the guided samples, at each real
# unconditional pass: how a calibration run watches CFG.
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class GuidanceTrace:
    """What guided sampling did to each of B samples over S steps.

    nfe: (B,) long, DiT forwards of that sample (one forward of one sample counts 1);
    switch_step: (B,) long, the first step run without the unconditional pass, -1 where
    every step was guided (a switched sample's NFE is S + switch_step under adaptive);
    cosine: (S, B) fp64, the cosine similarity of the conditional and unconditional
    velocity at each step, NaN where the unconditional pass was not run;
    block_evaluations: (B,) long, DiT blocks run for that sample (each of its rows counts),
    filled in by the caller that knows the depth and any block cache.
    """

    nfe: torch.Tensor
    switch_step: torch.Tensor
    cosine: torch.Tensor
    block_evaluations: torch.Tensor | None = None


class GuidedVelocity:
    """The sampling velocity (x (B, C, T, H, W), t (B,)) -> (B, C, T, H, W) around
    ``model(x, t, context (B, L, E), mask (B, L))``, counting its function evaluations.

    mode "none": conditional only; "cfg": classifier-free guidance at every step;
    "adaptive": CFG until a sample's cosine similarity of conditional and unconditional
    velocity (over its whole latent) exceeds ``threshold``, then conditional only. The
    step that measures the crossing still uses its guided velocity (both passes are paid
    for). The switch is per sample, so a sample's trajectory and NFE do not depend on
    which prompts share its batch; the unconditional pass runs on the unswitched samples
    only. A threshold >= 1 never switches (CFG); below -1 every sample is conditional
    from the first step, since a cosine is never below -1. Scale 1 is conditional only
    in every mode (guidance would not change the velocity).

    "linear_ag" is adaptive guidance whose unconditional velocity, at the steps where
    ``linear`` (S, 3) has a finite row (a, b, c), is not evaluated but predicted from the
    previous step: v_u(s) = a v_c(s) + b v_c(s-1) + c v_u(s-1) (the paper's LinearAG;
    ``LinearGuidanceFit`` fits the rows). Call once per step.
    """

    def __init__(self, model: Callable[..., torch.Tensor], context: torch.Tensor,
                 context_mask: torch.Tensor, null_context: torch.Tensor,
                 null_mask: torch.Tensor, scale: float, mode: str = "cfg",
                 threshold: float = 0.99, linear: torch.Tensor | None = None,
                 observer: Observer | None = None):
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance={mode!r} is not one of {GUIDANCE_MODES}")
        if threshold != threshold:
            raise ValueError("adaptive guidance threshold is NaN; pass a number (0.99)")
        if (mode == "linear_ag") != (linear is not None):
            raise ValueError("guidance=linear_ag needs its coefficients (linear=), and "
                             "only it takes them")
        self.model, self.scale, self.mode, self.threshold = model, scale, mode, threshold
        self.context, self.context_mask = context, context_mask
        self.null_context, self.null_mask = null_context, null_mask
        self.linear, self.observer = linear, observer
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # v_c, v_u
        batch = context.shape[0]
        switches = mode in ("adaptive", "linear_ag")
        unguided = mode == "none" or scale == 1.0 or (switches and threshold < -1)
        self.guided = torch.full((batch,), not unguided)
        self.nfe = torch.zeros(batch, dtype=torch.long)
        self.switch_step = torch.full((batch,), 0 if unguided else -1, dtype=torch.long)
        self.cosines: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = len(self.cosines)
        self.cosines.append(torch.full((x.shape[0],), float("nan"), dtype=torch.float64))
        if not self.guided.any():
            self.nfe += 1
            return self.model(x, t, self.context, self.context_mask)
        if self.linear is not None:
            if step >= len(self.linear):
                raise ValueError(f"LinearAG coefficients cover {len(self.linear)} steps; "
                                 f"step {step} was asked for")
            if step > 0 and bool(self.linear[step].isfinite().all()):
                return self._predicted_step(x, t, step)
        rows = self.guided.nonzero().squeeze(1)
        if len(rows) == x.shape[0]:  # the plain CFG batch, bitwise as without switching
            v_cond, v_uncond = self.model(
                torch.cat([x, x]), torch.cat([t, t]),
                torch.cat([self.context, self.null_context]),
                torch.cat([self.context_mask, self.null_mask])).chunk(2)
            velocity = v_uncond + self.scale * (v_cond - v_uncond)
            v_uncond_all = v_uncond
        else:
            both = self.model(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]),
                              torch.cat([self.context, self.null_context[rows]]),
                              torch.cat([self.context_mask, self.null_mask[rows]]))
            v_cond, v_uncond = both[: x.shape[0]], both[x.shape[0]:]
            velocity = v_cond.index_copy(
                0, rows.to(x.device),
                v_uncond + self.scale * (v_cond[rows] - v_uncond))
            v_uncond_all = v_cond.index_copy(0, rows.to(x.device), v_uncond)
        self.nfe += 1 + self.guided.long()
        if self.observer is not None:
            self.observer(step, v_cond[rows], v_uncond)
        self.previous = (v_cond, v_uncond_all)
        cosine = self.cosines[-1]
        cosine[rows] = velocity_cosine(v_cond[rows], v_uncond).cpu()
        if self.mode in ("adaptive", "linear_ag"):
            passed = torch.zeros_like(self.guided)
            passed[rows] = cosine[rows] > self.threshold
            self.switch_step[passed] = step + 1
            self.guided &= ~passed
        return velocity

    def _predicted_step(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """One conditional pass; the guided samples' unconditional velocity predicted."""
        a, b, c = self.linear[step].tolist()
        v_cond = self.model(x, t, self.context, self.context_mask)
        previous_cond, previous_uncond = self.previous
        v_uncond = a * v_cond + b * previous_cond + c * previous_uncond
        guided = self.guided.to(x.device).view(-1, *[1] * (x.ndim - 1))
        velocity = torch.where(guided, v_uncond + self.scale * (v_cond - v_uncond), v_cond)
        self.nfe += 1
        self.previous = (v_cond, v_uncond)
        return velocity

    def trace(self) -> GuidanceTrace:
        cosine = torch.stack(self.cosines) if self.cosines else \
            torch.empty(0, len(self.nfe), dtype=torch.float64)
        return GuidanceTrace(self.nfe.clone(), self.switch_step.clone(), cosine)


def alternate_steps(steps: int) -> list[int]:
    """LinearAG's predicted steps: every other one (1, 3, 5, ...), so each predicts from
    a step whose unconditional velocity was evaluated."""
    return list(range(1, steps, 2))


class LinearGuidanceFit:
    """Least squares for LinearAG's coefficients from CFG trajectories: at each step s of
    ``predicted``, v_u(s) ~ a v_c(s) + b v_c(s-1) + c v_u(s-1) over every element of every
    calibration sample. Pass ``observe`` as ``GuidedVelocity(mode="cfg", observer=...)``;
    only 3x3 normal equations per step are kept, whatever the model's size."""

    def __init__(self, steps: int, predicted: list[int]):
        if not all(0 < s < steps for s in predicted):
            raise ValueError(f"predicted steps {predicted} must lie in 1..{steps - 1}")
        self.steps, self.predicted = steps, set(predicted)
        self.gram = torch.zeros(steps, 3, 3, dtype=torch.float64)
        self.moment = torch.zeros(steps, 3, dtype=torch.float64)
        self.target_energy = torch.zeros(steps, dtype=torch.float64)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, step: int, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> None:
        if step in self.predicted:
            previous_cond, previous_uncond = self.previous
            inputs = torch.stack([v_cond, previous_cond, previous_uncond], -1)
            inputs = inputs.reshape(-1, 3).double().cpu()
            target = v_uncond.reshape(-1).double().cpu()
            self.gram[step] += inputs.T @ inputs
            self.moment[step] += inputs.T @ target
            self.target_energy[step] += target @ target
        self.previous = (v_cond, v_uncond)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ((S, 3) rows (a, b, c), NaN at the steps run for real; (S,) the relative
        squared error of each fitted step on the calibration data, NaN elsewhere)."""
        rows = torch.full((self.steps, 3), float("nan"), dtype=torch.float64)
        error = torch.full((self.steps,), float("nan"), dtype=torch.float64)
        for step in sorted(self.predicted):
            if self.target_energy[step] == 0:
                raise ValueError(f"LinearAG calibration saw no unconditional velocity at "
                                 f"step {step}")
            beta = torch.linalg.lstsq(self.gram[step], self.moment[step]).solution
            residual = (self.target_energy[step] - 2 * beta @ self.moment[step]
                        + beta @ self.gram[step] @ beta)
            rows[step] = beta
            error[step] = residual.clamp_min(0) / self.target_energy[step]
        return rows, error


def velocity_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, ...) pair -> (N,) fp64 cosine similarity of each sample's flattened tensors,
    clamped to [-1, 1]; 0 where either is all zero."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    norms = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny)
    return ((a * b).sum(dim=1) / norms).clamp(-1, 1)
