"""Exponential moving average of the trainable weights, kept beside the model.

The shadow tensors have the parameters' own type, so when the parallel layer shards the
parameters the EMA is sharded the same way (no full copy per rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    def current_decay(self, step: int) -> float:
        """Warm-up so early weights are not averaged with the random init for long."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - self.current_decay(step)
        torch._foreach_lerp_(list(self.shadow.values()),
                             [self.params[name].detach() for name in self.shadow], weight)

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
        for name, shadow in self.shadow.items():
            param = self.params[name]
            saved = param.detach().clone()
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
            shadow.copy_(state[name])
