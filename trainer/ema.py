"""Exponential moving average of the trainable weights, kept beside the model.

The shadow tensors have the parameters' own type and placement: under FSDP2/TP they are
DTensors holding this rank's shard (no full copy per rank), and checkpoints reshard them
like the parameters; under DeepSpeed ZeRO-3 they shadow the local partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from parallel.engine import local_tensor


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float,
                 before_swap: Callable[[], None] | None = None):
        """params: name -> the trainable tensor to average (a shard when sharded).
        ``before_swap`` runs before weights are exchanged (DeepSpeed ZeRO-3 must release
        gathered copies so the next forward sees the swapped partitions)."""
        self.decay = decay
        self.before_swap = before_swap
        self.params = params
        # at least fp32: in bf16 weights (DeepSpeed's bf16 section) each step's pull of
        # 1 - decay (0.001) toward them would round away
        self.shadow = {name: p.detach().to(torch.promote_types(p.dtype, torch.float32),
                                           copy=True) for name, p in params.items()}

    def current_decay(self, step: int) -> float:
        """Warm-up so early weights are not averaged with the random init for long."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int, applied: torch.Tensor | None = None) -> None:
        """``applied``: a 0-d bool on the device, False for a step whose update was skipped
        (the average then stays as it is), consumed there without a host read."""
        weight = 1.0 - self.current_decay(step)
        shadows = [local_tensor(s) for s in self.shadow.values()]
        params = [local_tensor(self.params[name]).detach() for name in self.shadow]
        params = [p.to(s.dtype) for p, s in zip(params, shadows, strict=True)]
        if applied is None:
            torch._foreach_lerp_(shadows, params, weight)
            return
        weights = {}  # lerp takes a tensor weight of the shadow's own dtype and device
        for shadow in shadows:
            if (shadow.dtype, shadow.device) not in weights:
                weights[shadow.dtype, shadow.device] = torch.where(
                    applied.to(shadow.device), weight, 0.0).to(shadow.dtype)
        torch._foreach_lerp_(shadows, params, [weights[s.dtype, s.device] for s in shadows])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the model with EMA weights inside the block; training weights after it."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange training and EMA weights in place."""
        if self.before_swap is not None:
            self.before_swap()
        for name, shadow in self.shadow.items():
            param, shadow = local_tensor(self.params[name]).detach(), local_tensor(shadow)
            saved = param.clone()
            param.copy_(shadow)
            shadow.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name, shadow in self.shadow.items():
            value = state[name]
            local_tensor(shadow).copy_(local_tensor(value))
