"""Resumable, deterministic batches over a map-style dataset.

Every epoch is a fresh permutation drawn from (seed, epoch); a data-parallel rank takes
every ``dp_size``-th batch-sized slice of it, so ranks see disjoint samples. The state is
(epoch, global batches consumed in the epoch): after ``load_state_dict`` the iterator
continues with exactly the next global batch, no sample repeated or skipped. A global
batch is the same samples however it is split, so resuming with a different number of
data-parallel ranks is exact as long as the global batch size is unchanged.

With ``num_workers`` > 0 the samples are built and collated in DataLoader worker
processes, not the training thread; the batches, their order and the state are the same
as with none (the state counts batches handed out, not those the workers prepared).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists: video (B, C, T, H, W), fps (B,), caption, key."""
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "fps": torch.tensor([float(s["fps"]) for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class ShuffledBatches:
    def __init__(self, dataset: Dataset, batch_size: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True, num_workers: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.batches_per_epoch = len(dataset) // (batch_size * dp_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one global "
                             f"batch ({batch_size} x {dp_size} ranks)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def _batch_indices(self) -> Iterator[list[int]]:
        """This rank's sample indices of every batch from the current position on."""
        epoch, position = self.epoch, self.position
        while True:
            order = self._order(epoch)
            for index in range(position, self.batches_per_epoch):
                start = (index * self.dp_size + self.dp_rank) * self.batch_size
                yield order[start: start + self.batch_size].tolist()
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a private generator: the loader's worker seed must not advance the global RNG,
        # whose state checkpoints restore
        loader = DataLoader(self.dataset, batch_sampler=self._batch_indices(),
                            num_workers=self.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            if self.position == self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self.position += 1
            yield batch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position,
                "global_batch_size": self.global_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("global_batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: the checkpoint was "
                                 f"written with {key}={state[key]}, this run has "
                                 f"{key}={getattr(self, key)}; the sample order would change")
        self.epoch, self.position = state["epoch"], state["position"]
