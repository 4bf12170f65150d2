"""A training step's values stay on the device until the loop reads them.

``trainer.train.train_step`` returns the loss, gradient norm and task metrics as 0-d
device tensors and skips a non-finite step on the device, so no step waits for the
device. ``StepLog`` keeps those values; ``read`` copies every pending step and any extra
flags (the preemption vote) to the host in one transfer, every ``trainer.log_every``
steps and at the steps that stop for the host anyway, and replays ``NonFiniteGuard``
over the steps in order, so its counts and its stop come out as if it had seen each
step as it ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; stops the run after
    ``limit`` in a row with an error saying where and what to change."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_row = 0
        self.total = 0

    def allows_update(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise FloatingPointError(
                f"step {step}: loss={loss}, grad_norm={grad_norm} were non-finite for "
                f"{self.in_row} steps in a row (trainer.max_nonfinite_steps={self.limit}); "
                f"lower recipe.lr, raise recipe.warmup_steps or use trainer.precision=fp32")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_row, self.total = state["in_row"], state["total"]


class StepLog:
    """Each step's values (0-d tensors on the training device, or host numbers) until
    ``read``; every step holds ``loss`` and ``grad_norm``."""

    def __init__(self, guard: NonFiniteGuard):
        self.guard = guard
        self.pending: list[tuple[int, dict[str, torch.Tensor | float]]] = []

    def add(self, step: int, values: dict[str, torch.Tensor | float]) -> None:
        self.pending.append((step, values))

    def read(self, write: Callable[[int, dict[str, float]], None], *flags: torch.Tensor
             ) -> list[float]:
        """Copy the pending steps' tensors and ``flags`` (0-d, on the same device) to the
        host in one transfer; ``write(step, record)`` each step in order, its record
        holding ``skipped_steps`` (the guard's count); the flags' values.

        Raises the guard's FloatingPointError at the step where the non-finite steps in
        a row reached the limit, after writing the steps before it."""
        tensors = [value.detach().reshape(1) for _, values in self.pending
                   for value in values.values() if isinstance(value, torch.Tensor)]
        tensors += [flag.reshape(1) for flag in flags]
        # one cat, one copy to the host (bf16 values promote to float32 exactly)
        numbers = iter(torch.cat(tensors).tolist() if tensors else [])
        pending, self.pending = self.pending, []
        for step, values in pending:
            record = {name: next(numbers) if isinstance(value, torch.Tensor) else value
                      for name, value in values.items()}
            self.guard.allows_update(step, record["loss"], record["grad_norm"])
            write(step, record | {"skipped_steps": self.guard.total})
        return list(numbers)
