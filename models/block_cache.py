"""Block caching for sampling: a DiT block's residual (output - input) from an earlier step
is reused instead of evaluating the block, attached from outside the model.

When a block is skipped for a batch row its output is that row's input plus the residual
the block produced the last time it ran for the row, so changes made by the blocks before
it still flow through. Which blocks run at a step is decided by the mode:

- ``block`` (Cache Me if You Can, Wimbauer et al., arXiv 2312.03209): a fixed schedule,
  (steps, depth) bool, from each block's mean relative L1 change curve measured on
  calibration prompts (``ChangeCurves``, ``block_schedule``): a block is reused while its
  change accumulated since it last ran stays under the threshold. Every row of the batch
  follows the schedule. (The paper's learned scale-shift adjustment is not used.)
- ``first_block`` (the first-block cache of ParaAttention and diffusers): block 0 always
  runs; a row reuses every other block while block 0's residual differs from its value
  at the row's last full step by less than the threshold (relative L1).
- ``teacache`` (Liu et al., arXiv 2411.19108): the relative L1 change of block 0's
  time-modulated input between consecutive steps is accumulated per row; while the sum
  stays under the threshold the row reuses every block (block 0 too), otherwise all run
  and the sum resets. No fitted rescaling polynomial: the raw change is accumulated.

Dynamic decisions are per batch row, so under classifier-free guidance the conditional
and the unconditional row of a sample decide on their own. The cache follows fixed rows
through the run: every DiT call of one sampling run must have the same batch (guidance
``cfg`` or ``none``; adaptive guidance changes the rows between steps and is refused).
Step 0 always runs every block (there is nothing cached), and a threshold of 0 never
reuses anything: the sampler is then bitwise the plain one.

Under tensor or context parallelism a block's input is this rank's shard and so is the
cache. The per-row L1 sums behind a dynamic decision cover the whole row on every rank,
so every rank makes the same decision and the blocks' collectives stay matched: DTensor
(tensor-parallel) sums are reduced by DTensor itself; for context parallelism pass
``sum_rows``, which sums a (R, L_local, ...) shard's rows over their real tokens on every
rank (``parallel.context_parallel.SequenceShards.row_sums``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from models.dit import modulate

CACHE_MODES = ("none", "block", "first_block", "teacache")
# (R, L_local, ...) -> (R,) sums of each row over every rank's real tokens.
RowSums = Callable[[torch.Tensor], torch.Tensor]


def local_row_sums(x: torch.Tensor) -> torch.Tensor:
    """(R, ...) -> (R,) fp64 sum of each row; a sharded DTensor's sums are all-reduced."""
    sums = x.double().sum(tuple(range(1, x.ndim)))
    return sums.full_tensor() if hasattr(sums, "full_tensor") else sums


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(R, ...) -> (len(rows), ...); a DTensor (sharded past dim 0) keeps its layout."""
    if not hasattr(x, "to_local"):
        return x[rows]
    return _like(x, x.to_local()[rows], (len(rows), *x.shape[1:]))


def put_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of (R, ...) ``x`` with ``values`` (len(rows), ...) in its ``rows``."""
    if not hasattr(x, "to_local"):
        return x.index_copy(0, rows, values)
    return _like(x, x.to_local().index_copy(0, rows, values.to_local()), tuple(x.shape))


def _like(dtensor: torch.Tensor, local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``local`` as a DTensor of global ``shape`` laid out like ``dtensor``."""
    stride = torch.empty(shape, device="meta").stride()
    return type(dtensor).from_local(local, dtensor.device_mesh, dtensor.placements,
                                    run_check=False, shape=torch.Size(shape), stride=stride)


def relative_l1(new: torch.Tensor, old: torch.Tensor, sum_rows: RowSums | None = None
                ) -> torch.Tensor:
    """(R, ...) pair -> (R,) fp64 |new - old|_1 / |old|_1 of each row, on the CPU."""
    sum_rows = sum_rows or local_row_sums
    change, size = sum_rows((new - old).abs()).cpu(), sum_rows(old.abs()).cpu()
    return change / size.clamp_min(torch.finfo(torch.float64).tiny)


class ChangeCurves:
    """Sums of each block's relative L1 residual change per step over calibration rows:
    ``mean()`` is the (steps, depth) fp64 curve, NaN at step 0 (nothing to compare to)."""

    def __init__(self, steps: int, depth: int):
        self.total = torch.zeros(steps, depth, dtype=torch.float64)
        self.rows = torch.zeros(steps, depth, dtype=torch.long)

    def add(self, step: int, block: int, change: torch.Tensor) -> None:
        if step >= len(self.total):
            raise ValueError(f"change curves cover {len(self.total)} steps; step {step} ran")
        self.total[step, block] += change.sum()
        self.rows[step, block] += len(change)

    def mean(self) -> torch.Tensor:
        curves = self.total / self.rows
        curves[0] = float("nan")
        return curves


def block_schedule(curves: torch.Tensor, threshold: float) -> torch.Tensor:
    """(steps, depth) change curves -> (steps, depth) bool, True where the block runs:
    step 0 always; afterwards a block is reused while the change accumulated since it last
    ran is below ``threshold``, and runs (resetting the sum) once it is not."""
    if not threshold >= 0:
        raise ValueError(f"block cache threshold={threshold} must be a number >= 0")
    runs = torch.ones(curves.shape, dtype=torch.bool)
    for block in range(curves.shape[1]):
        accumulated = 0.0
        for step in range(1, curves.shape[0]):
            accumulated += float(curves[step, block])
            if accumulated < threshold:
                runs[step, block] = False
            else:
                accumulated = 0.0
    return runs


@dataclass(frozen=True)
class CacheSettings:
    """What a sampling run caches: ``mode`` of CACHE_MODES, its ``threshold`` (relative L1)
    and, for mode "block", the calibration's (steps, depth) change ``curves``; on a
    context-parallel mesh, ``sum_rows`` (``SequenceShards.row_sums``) for the dynamic modes."""

    mode: str = "none"
    threshold: float = 0.0
    curves: torch.Tensor | None = None
    sum_rows: RowSums | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache={self.mode!r} is not one of {CACHE_MODES}")
        if not self.threshold >= 0:
            raise ValueError(f"cache threshold={self.threshold} must be a number >= 0")
        if (self.mode == "block") != (self.curves is not None):
            raise ValueError("cache=block needs the calibration's change curves (curves=), "
                             "and only it takes them")

    def new_cache(self, sum_rows: RowSums | None = None,
                  curves: ChangeCurves | None = None) -> BlockCache:
        schedule = None if self.curves is None else block_schedule(self.curves, self.threshold)
        return BlockCache(self.mode, self.threshold, schedule, sum_rows or self.sum_rows,
                          curves)


class BlockCache:
    """The cache of one sampling run. ``with cache.attached(dit):`` every call of ``dit``
    inside is one step. ``evaluations`` (R,) long counts the blocks that ran for each batch
    row; ``calls`` the DiT calls. ``curves``, when given, records the relative change of
    every block's residual at every step (calibration; use mode "none")."""

    def __init__(self, mode: str, threshold: float, schedule: torch.Tensor | None = None,
                 sum_rows: RowSums | None = None, curves: ChangeCurves | None = None):
        if mode not in CACHE_MODES:
            raise ValueError(f"cache={mode!r} is not one of {CACHE_MODES}")
        if (mode == "block") != (schedule is not None):
            raise ValueError("cache=block needs a schedule, and only it takes one")
        self.mode, self.threshold, self.schedule = mode, threshold, schedule
        self.sum_rows, self.curves = sum_rows, curves
        self.calls = 0
        self.evaluations = torch.zeros(0, dtype=torch.long)
        self.residuals: dict[int, torch.Tensor] = {}
        self.runs = torch.zeros(0, dtype=torch.bool)  # rows whose blocks run this step
        self.reference: torch.Tensor | None = None    # first_block / teacache state
        self.accumulated = torch.zeros(0, dtype=torch.float64)

    @contextmanager
    def attached(self, dit: nn.Module) -> Iterator[BlockCache]:
        """Route every block of ``dit`` through the cache; the weights are untouched."""
        blocks = list(dit.blocks)
        own = [block.__dict__.get("forward") for block in blocks]  # an instance's own forward
        for index, block in enumerate(blocks):
            block.forward = self._cached_forward(index, block, block.forward)
        try:
            yield self
        finally:
            for block, forward in zip(blocks, own, strict=True):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward

    def _cached_forward(self, index: int, block: nn.Module, forward: Callable):
        def cached(x, modulation, context, context_mask, rope=None):
            if index == 0:
                self._start_step(block, x, modulation)
            runs = self._rows_that_run(index)
            self.evaluations += runs.long()
            previous = self.residuals.get(index)
            if bool(runs.all()):
                out = forward(x, modulation, context, context_mask, rope)
                residual = out - x
            elif not bool(runs.any()):
                return x + previous
            else:
                rows = runs.nonzero().squeeze(1).to(x.device)
                mask = None if context_mask is None else take_rows(context_mask, rows)
                x_rows = take_rows(x, rows)
                ran = forward(x_rows, take_rows(modulation, rows), take_rows(context, rows),
                              mask, rope)
                out = put_rows(x + previous, rows, ran)
                residual = put_rows(previous, rows, ran - x_rows)
            if index == 0 and self.mode == "first_block":
                self._decide_from_first_residual(residual)
            if self.curves is not None and previous is not None:
                self.curves.add(self.calls - 1, index, relative_l1(residual, previous,
                                                                   self.sum_rows))
            self.residuals[index] = residual
            return out
        return cached

    def _start_step(self, block: nn.Module, x: torch.Tensor, modulation: torch.Tensor) -> None:
        rows = x.shape[0]
        if self.calls == 0:
            self.evaluations = torch.zeros(rows, dtype=torch.long)
            self.accumulated = torch.zeros(rows, dtype=torch.float64)
        elif rows != len(self.evaluations):
            raise ValueError(f"the block cache follows fixed batch rows, but a step brought "
                             f"{rows} rows after {len(self.evaluations)}; cache only with "
                             f"guidance=cfg or none, whose batch never changes")
        self.calls += 1
        self.runs = torch.ones(rows, dtype=torch.bool)
        if self.mode == "teacache":
            self._decide_from_modulated_input(block, x, modulation)

    def _rows_that_run(self, index: int) -> torch.Tensor:
        step = self.calls - 1
        if self.mode == "block" and step > 0:
            if step >= len(self.schedule):
                raise ValueError(f"the block cache schedule covers {len(self.schedule)} "
                                 f"steps; step {step} was asked for (calibrate for these "
                                 f"steps)")
            return self.schedule[step, index].expand(len(self.evaluations))
        if self.mode == "first_block" and index == 0:
            return torch.ones(len(self.evaluations), dtype=torch.bool)
        return self.runs

    def _decide_from_modulated_input(self, block: nn.Module, x: torch.Tensor,
                                     modulation: torch.Tensor) -> None:
        """TeaCache: block 0's attention input as the block itself would modulate it."""
        shift, scale = (block.modulation[None] + modulation)[:, :2].unbind(1)
        indicator = modulate(block.attn_norm(x), shift, scale)
        if self.reference is not None:
            self.accumulated += relative_l1(indicator, self.reference, self.sum_rows)
            self.runs = ~(self.accumulated < self.threshold)
            self.accumulated[self.runs] = 0.0
        self.reference = indicator

    def _decide_from_first_residual(self, residual: torch.Tensor) -> None:
        """First-block cache: compare with block 0's residual at each row's last full step."""
        if self.reference is None:
            self.reference = residual
            return
        self.runs = ~(relative_l1(residual, self.reference, self.sum_rows) < self.threshold)
        if bool(self.runs.any()):
            rows = self.runs.nonzero().squeeze(1).to(residual.device)
            self.reference = put_rows(self.reference, rows, take_rows(residual, rows))
