"""Where shard reading (data/shards.py) stands, and what it saves to resume.

A worker's state is ``{"cursor": [epoch, shard, sample, copy], "pending": [[epoch, shard,
sample, copy], ...], "skipped": {reason: count}}``: the next position it reads, the
positions of the samples waiting in part-filled buckets, and the samples skipped so far.
ShardBatches keeps each worker's state as of the batches handed out, for checkpoints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from torch.utils.data import DataLoader

from data.buckets import Bucket, BucketGrid

if TYPE_CHECKING:
    from data.shards import MixedShards, VideoShards

FRESH_STATE = {"cursor": [0, 0, 0, 0], "pending": [], "skipped": {}}  # a worker's, unstarted


class Position(NamedTuple):
    """The `copy`-th use in `epoch` of sample `sample` of shard `shard` in the worker's
    shard list of that epoch; positions order as the worker reads them."""

    epoch: int
    shard: int = 0
    sample: int = 0
    copy: int = 0

    def first_copy(self) -> Position:
        """This sample's first use in the epoch."""
        return self._replace(copy=0)

    def after(self, copies: int) -> Position:
        """The position read next, for a sample used `copies` times this epoch."""
        if self.copy + 1 < copies:
            return self._replace(copy=self.copy + 1)
        return Position(self.epoch, self.shard, self.sample + 1)


@dataclass
class ReadProgress:
    """A worker's read `cursor` (the next position it reads) and its skips by reason."""

    cursor: Position
    skipped: Counter


class BucketBatches:
    """Samples waiting in their bucket until it holds a batch. Each batch leaves with its
    bucket [T, H, W], the worker's id under ``_worker`` and, under ``_state``, its state
    to resume from after that batch."""

    def __init__(self, grid: BucketGrid, collate: Callable[[list[dict]], dict[str, Any]],
                 progress: ReadProgress, worker: int):
        self.grid, self.collate, self.progress, self.worker = grid, collate, progress, worker
        self.waiting: dict[Bucket, list[tuple[Position, dict[str, Any]]]] = {}

    def add(self, position: Position, bucket: Bucket,
            sample: dict[str, Any]) -> dict[str, Any] | None:
        """The batch of `bucket` when `sample` fills it, else None."""
        waiting = self.waiting.setdefault(bucket, [])
        waiting.append((position, sample))
        return self.emit(bucket) if len(waiting) == self.grid.batch_size(bucket) else None

    def flush(self) -> Iterator[dict[str, Any]]:
        """The part-filled buckets' batches, the one waiting longest first."""
        while self.waiting:
            yield self.emit(min(self.waiting, key=lambda b: self.waiting[b][0][0]))

    def emit(self, bucket: Bucket) -> dict[str, Any]:
        batch = self.collate([sample for _, sample in self.waiting.pop(bucket)])
        return self.tagged({**batch, "bucket": [bucket.frames, bucket.height, bucket.width]})

    def tagged(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with the worker's id and state (``{}``: the state alone, whose skip
        counts still count)."""
        pending = [list(p) for waiting in self.waiting.values() for p, _ in waiting]
        state = {"cursor": list(self.progress.cursor), "pending": pending,
                 "skipped": dict(self.progress.skipped)}
        return {**batch, "_worker": self.worker, "_state": state}


class ShardBatches:
    """Iterates a VideoShards (or MixedShards) through DataLoader workers and tracks the
    state of the batches handed out (not of those prefetched), for checkpoints of this
    dp rank."""

    def __init__(self, dataset: VideoShards | MixedShards, num_workers: int = 0,
                 prefetch_factor: int = 2):
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor
        self._states: dict[int, dict] = {}

    @property
    def skipped(self) -> Counter:
        """Samples (and shards) skipped so far, by reason, over all workers, as of the
        batches handed out; ``dropped_by_weight`` counts samples of weight-0 draws."""
        return sum((self.dataset.skipped_of(s) for s in self._states.values()), Counter())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.resume = dict(self._states)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        for batch in loader:
            self._states[batch.pop("_worker")] = batch.pop("_state")
            if batch:
                yield batch
        if self.dataset.epochs is None:
            raise RuntimeError(f"no usable sample in data.shards (skipped: {dict(self.skipped)})")

    def _identity(self) -> dict[str, int]:
        return {**self.dataset.identity(), "num_workers": self.num_workers}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "workers": {str(w): s for w, s in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This rank's state, or a list of every rank's states (this dp rank's is used)."""
        if isinstance(state, list):
            dp_rank = self.dataset.identity()["dp_rank"]
            mine = [s for s in state if s["dp_rank"] == dp_rank]
            if not mine:
                raise ValueError(f"the checkpoint holds no data state for dp rank "
                                 f"{dp_rank} (it was written with dp_size="
                                 f"{state[0]['dp_size'] if state else '?'})")
            state = mine[0]
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the webdataset position: the checkpoint was written with "
                    f"{key}={state.get(key)}, this run has {key}={value}; shards are split by "
                    f"data-parallel rank and worker, so samples would repeat or be skipped. "
                    f"Resume with the same parallel dp size, data.num_workers, data.seed "
                    f"and data.shards (and data.image_shards)")
        self._states = {int(w): s for w, s in state["workers"].items()}
