"""The native training engine: one process, DTensor TP/CP, or FSDP2 — one step API.

The trainer calls ``zero_grad``, ``backward(loss)``, ``clip_and_step(max_norm, allow)``
and reads ``module``/``optimizer``/``scheduler``; ``parallel.deepspeed_engine`` offers
the same methods for DeepSpeed. The optimizer comes from a factory the trainer passes in
(``params -> (optimizer, scheduler)``), so this layer never imports the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

OptimizerFactory = Callable[[list[nn.Parameter]], tuple[torch.optim.Optimizer, object]]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor is its own)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def total_grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients as one flat vector, whatever mesh each lives on.

    DTensor gradients are grouped by mesh; each group's norm is reduced over its mesh
    (Shard dims summed, Replicate dims counted once), then the groups are combined.
    """
    by_mesh: dict[object, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for param in params:
        if param.grad is None:
            continue
        if isinstance(param.grad, DTensor):
            by_mesh.setdefault(param.grad.device_mesh, []).append(param.grad)
        else:
            plain.append(param.grad)
    squares = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        squares.append(norm.full_tensor().float() ** 2)
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain, foreach=True).float() ** 2)
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


@torch.no_grad()
def clip_grads(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their total norm is at most ``max_norm``; the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = total_grad_norm(params).item()
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for param in params:
            param.grad.mul_(scale)
    return norm


class NativeEngine:
    """Optimizer step over a (possibly DTensor/FSDP2-sharded) model."""

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory):
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def settle_partial_grads(self) -> None:
        """Under tensor parallelism without FSDP, a replicated parameter used on sequence
        shards gets a Partial (unreduced) DTensor gradient. Reduce each once here; left
        Partial, DTensor would all-reduce it again inside every op that reads it (the grad
        norm and each AdamW update), 4x the traffic."""
        for param in self.params:
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(param.device_mesh, param.placements)

    def clip_and_step(self, max_norm: float, allow_update: Callable[[float], bool]) -> float:
        """Clip to ``max_norm`` (inf: measure only), step if ``allow_update(norm)``."""
        self.settle_partial_grads()
        norm = clip_grads(self.params, max_norm)
        if allow_update(norm):
            self.optimizer.step()
        return norm

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """What an EMA averages: the trainable parameters (their local shards if sharded)."""
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}
