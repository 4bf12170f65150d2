"""The random draws of one training step, keyed per sample of the global batch.

Each sample owns one generator per stream (caption dropout, t, noise, ...), seeded from
(seed, step, global sample index, stream). A data-parallel rank draws only its own rows:
no rank ever materialises the noise of the whole global batch (at batch 256 of
16x32x96x96 latents that would be ~4.8 GB per rank per step), the draws of a sample do
not depend on which rank holds it or on the mesh, and a resumed run draws the same.
Streams are independent, so a task may add one (the pixel loss's window) without moving
any other draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


def sample_seed(seed: int, step: int, index: int, stream: str) -> int:
    """A 64-bit seed for (seed, step, global sample index, stream). A hash rather than
    arithmetic on the integers, so neighbouring steps or samples never share a seed."""
    key = f"{seed}/{step}/{index}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class StepDraws:
    """The draws of step ``step`` of a run seeded ``seed``, made on ``device`` (the
    training device: the noise is born where it is used)."""

    def __init__(self, seed: int, step: int, device: torch.device | str = "cpu"):
        self.seed, self.step, self.device = seed, step, torch.device(device)

    def generator(self, index: int, stream: str) -> torch.Generator:
        """The generator of global sample ``index`` for ``stream``."""
        return torch.Generator(self.device).manual_seed(
            sample_seed(self.seed, self.step, index, stream))

    def per_sample(self, stream: str, rows: slice,
                   draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """``draw(generator)`` (a tensor with a leading dim of 1) for each global sample in
        ``rows``, concatenated: (rows, ...)."""
        if rows.step not in (None, 1) or not 0 <= rows.start < rows.stop:
            raise ValueError(f"rows {rows} must be a non-empty contiguous slice of the batch")
        return torch.cat([draw(self.generator(index, stream))
                          for index in range(rows.start, rows.stop)])
