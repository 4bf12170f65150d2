"""Datasets from the ``data`` config group."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

from torch.utils.data import Dataset

from data.loader import ShuffledBatches
from data.shards import (
    ShardBatches,
    WebDatasetConfig,
    build_shard_batches,
    build_val_shard_batches,
)
from data.synthetic import SyntheticVideos
from parallel.mesh import ParallelContext
from trainer.config import SyntheticDataConfig, TrainConfig


def build_datasets(cfg: SyntheticDataConfig | WebDatasetConfig
                   ) -> tuple[Dataset | None, Dataset | None]:
    """(train, held-out validation) map-style datasets; (None, None) for shards, which are
    streamed by ``build_train_batches`` and ``build_val_batches``."""
    if isinstance(cfg, WebDatasetConfig):
        return None, None
    common = dict(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps,
                  seed=cfg.seed)
    return (SyntheticVideos(cfg.num_samples, split="train", **common),
            SyntheticVideos(cfg.val_samples, split="val", **common))


class EveryRankPosition:
    """Shard loaders keep a position per rank; checkpoints are written by rank 0, so the
    state gathers every rank's position and each rank restores its own."""

    def __init__(self, batches: ShardBatches, ctx: ParallelContext):
        self.batches, self.ctx = batches, ctx

    def __iter__(self):
        return iter(self.batches)

    @property
    def skipped(self):
        return self.batches.skipped

    def state_dict(self) -> dict:
        return {"ranks": self.ctx.gather_objects(self.batches.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["ranks"])


def build_train_batches(cfg: TrainConfig, train_data: Dataset | None,
                        ctx: ParallelContext) -> ShuffledBatches | EveryRankPosition:
    """This rank's slice of every global batch: split by the *data-parallel* rank only, so
    all cp/tp ranks of one replica get the same samples."""
    if isinstance(cfg.data, WebDatasetConfig):
        return EveryRankPosition(build_shard_batches(cfg.data, ctx.dp_rank, ctx.dp_size), ctx)
    return ShuffledBatches(train_data, cfg.recipe.batch_size // ctx.dp_size, cfg.trainer.seed,
                           ctx.dp_rank, ctx.dp_size)


def build_val_batches(cfg: TrainConfig) -> Callable[[], Iterator[dict]] | None:
    """A function whose every call yields the held-out batches from the start, in one fixed
    order, the same on every rank (sharded models need all ranks in the forward); None
    when there is no held-out data.

    Shards: every sample of ``data.val_shards`` once, each batch from one bucket as in
    training (part-filled buckets end as smaller batches). Synthetic: the val split in
    index order, batches of ``recipe.batch_size`` (a remainder smaller than that is left
    out)."""
    if isinstance(cfg.data, WebDatasetConfig):
        if cfg.data.val_shards is None:
            return None
        build_val_shard_batches(cfg.data)  # a missing shard fails now, not at the first eval
        return lambda: iter(build_val_shard_batches(cfg.data))
    if cfg.data.val_samples == 0:
        return None
    _, val_data = build_datasets(cfg.data)

    def batches() -> Iterator[dict]:
        # a fresh loader per call: one stopped early would otherwise resume mid-epoch
        loader = ShuffledBatches(val_data, cfg.recipe.batch_size, seed=0, shuffle=False)
        return islice(iter(loader), loader.batches_per_epoch)

    batches()  # a val set smaller than one batch fails now, not at the first eval
    return batches
