"""The training-engine interface, and the native engine: one process, DTensor TP/CP, or
FSDP2.

The trainer drives any engine through ``TrainingEngine`` (``parallel.deepspeed_engine``
implements it for DeepSpeed), never asking which one it has. The optimizer comes from a
factory the trainer passes in (``params -> (optimizer, scheduler)``), so this layer never
imports the trainer.

Nothing here reads a value back to the host: the gradient norm is a device tensor, the
clip scale is applied by foreach ops, and a step refused by a device-side flag is skipped
inside the fused optimizer (its ``found_inf``), so the host never waits for the device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement
from torch.distributed.tensor.experimental import implicit_replication

from parallel.checkpoint import Written, load_training_state, save_training_state

OptimizerFactory = Callable[[list[nn.Parameter]], tuple[torch.optim.Optimizer, object]]
# allow_update(norm) -> a host bool, or a 0-d bool tensor decided on the device
UpdateGate = Callable[[torch.Tensor], bool | torch.Tensor]


class TrainingEngine(Protocol):
    """What the trainer drives: a model, its optimizer and LR schedule, one step API.

    ``module`` is what the forward goes through; ``scheduler`` is stepped by the trainer
    every step (skipped updates included). Collective methods run on every rank.
    """

    module: nn.Module
    scheduler: Any

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's loss (collective)."""

    def clip_and_step(self, max_norm: float, allow_update: UpdateGate) -> torch.Tensor | float:
        """Clip to ``max_norm`` and update iff ``allow_update(norm)``; the norm before
        clipping (collective)."""

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The local tensors of the trainable weights by name, live: an EMA averages them
        and swaps its weights into them."""

    def release_params(self) -> None:
        """Make the next forward read ``ema_tensors`` again (call before writing them)."""

    def num_trainable(self) -> int:
        """Trainable parameters of the whole model (not this rank's share)."""

    def save(self, directory: Path, ema_state: dict[str, torch.Tensor],
             trainer_state: dict, asynchronous: bool = False) -> Written:
        """Weights, optimizer, ``ema_state`` and rank 0's ``trainer_state`` into the
        existing ``directory``; what the checkpointer gets (see ``parallel.checkpoint``).
        Collective."""

    def load(self, directory: Path, ema_state: dict[str, torch.Tensor]) -> dict:
        """Restore what ``save`` wrote, EMA into ``ema_state``; the trainer state.
        Collective."""


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor is its own)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@functools.cache
def counts_its_copy(mesh: DeviceMesh, placements: tuple[Placement, ...]) -> bool:
    """Whether this rank's local part of a DTensor on ``mesh`` is the copy counted in a sum
    over all ranks: coordinate 0 on every mesh dim the tensor is replicated over, and the
    instance of ``mesh`` that holds global rank 0 (a mesh smaller than the world repeats
    over the other ranks, holding the same values)."""
    if any(placement.is_partial() for placement in placements):
        raise ValueError(f"a Partial gradient ({placements}) reached the grad norm: reduce it "
                         f"to its parameter's placement first (settle_partial_grads)")
    coordinate = mesh.get_coordinate()
    first_replica = all(index == 0 for index, placement in zip(coordinate, placements,
                                                                strict=True)
                        if placement.is_replicate())
    return first_replica and 0 in mesh.mesh.flatten().tolist()


def total_grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients as one flat vector, whatever mesh each lives on: a 0-d
    float32 tensor on the gradients' device, identical on every rank, never read here.

    Each rank sums the squares of the gradient parts it counts (a replicated part on one
    rank only, see ``counts_its_copy``), and one all-reduce over all ranks adds the sums:
    one collective for every mesh at once, however many dims it has. Plain (non-DTensor)
    gradients are the same on every rank and are counted on rank 0.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.get_total_norm(grads, foreach=True).float()
    counted = [g.to_local() if isinstance(g, DTensor) else g for g in grads
               if (counts_its_copy(g.device_mesh, tuple(g.placements))
                   if isinstance(g, DTensor) else dist.get_rank() == 0)]
    device = local_tensor(grads[0]).device
    squares = (torch.nn.utils.get_total_norm(counted, foreach=True).float().to(device) ** 2
               if counted else torch.zeros((), device=device))
    dist.all_reduce(squares)
    return squares.sqrt()


@torch.no_grad()
def clip_grads(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their total norm is at most ``max_norm`` (inf: measure only); the
    norm before, on the device. The scale min(1, max_norm / (norm + 1e-6)) is applied by
    one foreach multiply of the local gradients; a non-finite norm makes the gradients
    non-finite too, and such a step is refused anyway."""
    params = [p for p in params if p.grad is not None]
    norm = total_grad_norm(params)
    if params and math.isfinite(max_norm):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([local_tensor(p.grad) for p in params], scale)
    return norm


IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable")


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """Keep ``optimizer``'s kernel choice across ``load_state_dict``.

    A checkpoint's param groups replace the optimizer's, kernel switches included: one
    written by a non-fused AdamW would turn ``fused`` off, and the device-side skip with
    it. After every load the switches it was built with are put back, and with fused or
    capturable each step count moves where those kernels keep it (float32, on the
    parameter's device; a non-fused checkpoint holds it on the CPU)."""
    built = [{key: group[key] for key in IMPLEMENTATION_KEYS if key in group}
             for group in optimizer.param_groups]

    def restore(loaded: torch.optim.Optimizer) -> None:
        for group, switches in zip(loaded.param_groups, built, strict=True):
            group.update(switches)
            if not (group.get("fused") or group.get("capturable")):
                continue
            for param in group["params"]:
                state = loaded.state.get(param, {})
                if "step" in state:
                    state["step"] = state["step"].to(dtype=torch.float32,
                                                     device=local_tensor(param).device)

    optimizer.register_load_state_dict_post_hook(restore)


def step_plain_as_replicated(optimizer: torch.optim.Optimizer) -> None:
    """Run every ``optimizer.step`` (DCP's too: it steps a fresh optimizer once to create
    its state) with plain tensors taken as replicated DTensors. Under tensor parallelism
    without FSDP the trainable text conditioner stays plain beside the DiT's DTensors and
    a fused kernel steps both in one call, a mix DTensor refuses unless told; the plain
    ones are indeed the same on every rank."""
    inner = optimizer.step

    @functools.wraps(inner)  # keeps LambdaLR's marker: no 'step overridden' warning
    def step(*args, **kwargs):
        with implicit_replication():
            return inner(*args, **kwargs)

    optimizer.step = step


class NativeEngine:
    """Optimizer step over a (possibly DTensor/FSDP2-sharded) model.

    A device-side ``allow_update`` decision needs an optimizer that skips a step on its
    ``found_inf`` flag: torch's fused Adam/AdamW (``fused=True``)."""

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory):
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params)
        keep_implementation(self.optimizer)
        step_plain_as_replicated(self.optimizer)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)  # a DTensor's numel is its full size

    def release_params(self) -> None:
        """Nothing to release: FSDP2 gathers from the shards at every forward."""

    def save(self, directory: Path, ema_state: dict[str, torch.Tensor],
             trainer_state: dict, asynchronous: bool = False) -> Written:
        """A DCP checkpoint that loads at any mesh (``save_training_state``)."""
        return save_training_state(directory, self.module, self.optimizer, ema_state,
                                   trainer_state, asynchronous)

    def load(self, directory: Path, ema_state: dict[str, torch.Tensor]) -> dict:
        return load_training_state(directory, self.module, self.optimizer, ema_state)

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

    def clip_and_step(self, max_norm: float, allow_update: UpdateGate) -> torch.Tensor:
        """Clip to ``max_norm`` (inf: measure only) and step if ``allow_update(norm)``; the
        norm before clipping (0-d, on the device). A tensor answer is consumed on the
        device: the fused optimizer skips the whole update (weights, moments, step count)
        where it is False."""
        self.settle_partial_grads()
        norm = clip_grads(self.params, max_norm)
        allowed = allow_update(norm)
        if not isinstance(allowed, torch.Tensor):
            if allowed:
                self.optimizer.step()
            return norm
        if not self.optimizer.defaults.get("fused"):
            raise ValueError(
                f"a device-side update decision needs an optimizer that reads found_inf; "
                f"{type(self.optimizer).__name__} was built with fused=False: build it "
                f"with fused=True")
        self.optimizer.found_inf = (~allowed).float()
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None  # a later step (or DCP's state init) is not gated
        return norm

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """What an EMA averages: the trainable parameters (their local shards if sharded)."""
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}
