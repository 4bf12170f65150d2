"""Classifier-free guidance's two branches on different ranks (xDiT's CFG parallel).

The sampler calls the DiT once per step on the batch [x; x] with [text; empty text], so
the conditional rows come first and the unconditional rows second. Over a group of n
ranks (n = 2 for CFG) rank r runs rows [r B/n, (r+1) B/n) only, conditional on rank 0
and unconditional on rank 1, and one all-gather puts every rank's velocities back in
batch order, so the sampler sees the whole batch's output on every rank.

Bytes one rank sends per DiT call: its own rows of the velocity, B/n C T H W E for E
bytes per element, to each of the n - 1 peers (for CFG of one fp32 video: the latent's
C T H W 4 bytes). A batch that does not divide by n (a conditional-only step of one
sample) runs whole on every rank and sends nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# torch 2.13 renamed the flat-buffer all-gather; older releases only have the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class BatchSplit:
    """Hooks on a velocity module ``(x (B, ...), t (B,), context (B, L, E), mask (B, L))
    -> (B, ...)`` that run this rank's 1/n of the batch rows and all-gather the outputs.
    ``exchanged_bytes`` counts what this rank sent."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.exchanged_bytes = 0
        self._split = False  # whether the running call was split
        module.register_forward_pre_hook(self._local_rows)
        module.register_forward_hook(self._gather_rows)

    def _local_rows(self, module: nn.Module, args: tuple) -> tuple:
        batch = args[0].shape[0]
        self._split = batch % self.size == 0
        if not self._split:
            return args
        rows = batch // self.size
        return tuple(arg if arg is None else arg.narrow(0, self.rank * rows, rows)
                     for arg in args)

    def _gather_rows(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not self._split:
            return out
        out = out.contiguous()
        gathered = out.new_empty(self.size * out.shape[0], *out.shape[1:])
        _all_gather(gathered, out, group=self.group)
        self.exchanged_bytes += (self.size - 1) * out.numel() * out.element_size()
        return gathered
