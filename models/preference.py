"""Preference losses for a flow-matching model: plain functions on per-sample errors.

A pair is a preferred (w) and a rejected (l) latent of one caption, noised with the same
x0 at the same t. The model's error on a side is e = mean((v̂ − v)²) over that sample's
elements (the per-sample flow-matching loss). A lower error is a higher likelihood, so
the implicit reward of a side is r = −β·e (SimPO, arXiv 2405.14734, in the diffusion
form of pixel-space post-training, arXiv 2409.17565), or r = −β·(e − e_ref) against a
frozen reference model (Diffusion-DPO, arXiv 2311.12908). Both losses are
−log σ(r_w − r_l − γ), γ an optional margin (SimPO's).

Diffusion-DPO's error is the noise error ‖ε̂ − ε‖². Under our flow (models/flow.py)
x_t = x0 + t·v exactly, so x̂0 − x0 = −t·(v̂ − v) and ‖ε̂ − ε‖² = t²·‖v̂ − v‖²: the noise
error is the velocity error weighted by t², which ``beta_t`` folds into β (the (1 − t)²
schedule of Flow-DPO, arXiv 2501.13918, where t = 1 is noise, is t² in our
convention, where t = 1 is data). With one t per pair, the factor is the same for both
sides.

Gradients. With d = r_w − r_l − γ the loss is softplus(−d), so
∂L/∂θ = −σ(−d)·∂d/∂θ. For SimPO ∂d/∂θ = −β·∂(e_w − e_l)/∂θ, hence
∂L/∂θ = β·σ(−d)·∂(e_w − e_l)/∂θ with σ(−d) ∈ (0, 1): a step along −∂L/∂θ lowers e_w
relative to e_l for every β > 0. As β → 0, d → −γ and ∂L/∂θ = β·σ(γ)·∂(e_w − e_l)/∂θ +
O(β²): the gradient points along ∂(e_w − e_l)/∂θ with magnitude linear in β, so the loss
vanishes into a plain "raise the winner, lower the loser" signal and never reverses it.
For DPO at policy = reference, d = 0, L = log 2 and ∂L/∂θ = (β/2)·∂(e_w − e_l)/∂θ (the
reference errors carry no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or wider if it is: the reward is a small difference of two errors, never
    taken in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) predicted and target velocities -> (B,) mean squared error per sample, in
    fp32 or wider."""
    error = (_wide(prediction) - _wide(target)) ** 2
    return error.reshape(error.shape[0], -1).mean(dim=1)


def beta_t(beta: float, t: torch.Tensor, schedule: str = "constant") -> torch.Tensor:
    """β per pair (B,): constant, or β·t² for ``schedule="eps"`` (Diffusion-DPO on the
    noise error; the module docstring derives the factor)."""
    if schedule == "constant":
        return torch.full_like(_wide(t), beta)
    if schedule == "eps":
        return beta * _wide(t) ** 2
    raise ValueError(f"beta schedule {schedule!r} must be 'constant' or 'eps'")


def reward_margin(error_win: torch.Tensor, error_lose: torch.Tensor, beta: torch.Tensor,
                  reference_win: torch.Tensor | None = None,
                  reference_lose: torch.Tensor | None = None) -> torch.Tensor:
    """r_w − r_l per pair (B,): −β·(e_w − e_l) without a reference (SimPO), −β·((e_w −
    e_w^ref) − (e_l − e_l^ref)) with one (Diffusion-DPO). Positive: the model prefers the
    winner."""
    difference = error_win - error_lose
    if reference_win is not None and reference_lose is not None:
        difference = difference - (reference_win - reference_lose)
    return -beta * difference


def preference_loss(margin: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """mean −log σ(margin − γ), an fp32 scalar (logsigmoid: no overflow for large β)."""
    return -F.logsigmoid(margin - gamma).mean()


def implicit_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose winner has the higher implicit reward; an exact tie counts
    half (the model prefers neither), so an untrained policy equal to its reference
    scores 0.5, not 0."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
