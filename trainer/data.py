"""Datasets from the ``data`` config group."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

from torch.utils.data import Dataset

from data.loader import ShuffledBatches
from data.shards import WebDatasetConfig, build_shard_batches, build_val_shard_batches
from data.synthetic import SyntheticVideos
from parallel.mesh import ParallelContext
from trainer.config import ConfigError, SyntheticDataConfig, TrainConfig
from trainer.device_batches import DeviceBatches


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

    def __init__(self, batches: DeviceBatches, ctx: ParallelContext):
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
                        ctx: ParallelContext) -> DeviceBatches | EveryRankPosition:
    """This rank's slice of every global batch, on ``ctx.device``: split by the
    *data-parallel* rank only, so all cp/tp ranks of one replica get the same samples.
    Synthetic samples are built in ``data.num_workers`` loader processes."""
    if isinstance(cfg.data, WebDatasetConfig):
        try:  # shards that do not exist, or fewer than the ranks they must feed
            batches = build_shard_batches(cfg.data, ctx.dp_rank, ctx.dp_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return EveryRankPosition(DeviceBatches(batches, ctx.device), ctx)
    if cfg.data.num_samples < cfg.recipe.batch_size:
        raise ConfigError(f"data.num_samples={cfg.data.num_samples} is fewer than one global "
                          f"batch of recipe.batch_size={cfg.recipe.batch_size}")
    return DeviceBatches(ShuffledBatches(train_data, cfg.recipe.batch_size // ctx.dp_size,
                                         cfg.trainer.seed, ctx.dp_rank, ctx.dp_size,
                                         num_workers=cfg.data.num_workers), ctx.device)


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
        check_val_shards(cfg.data)
        return lambda: iter(build_val_shard_batches(cfg.data))
    if cfg.data.val_samples == 0:
        return None
    if cfg.data.val_samples < cfg.recipe.batch_size:  # no validation batch at all
        raise ConfigError(f"data.val_samples={cfg.data.val_samples} is fewer than one "
                          f"validation batch of recipe.batch_size={cfg.recipe.batch_size}; "
                          f"raise it, or set it to 0 for no validation")
    _, val_data = build_datasets(cfg.data)

    def batches() -> Iterator[dict]:
        # a fresh loader per call: one stopped early would otherwise resume mid-epoch
        loader = ShuffledBatches(val_data, cfg.recipe.batch_size, seed=0, shuffle=False)
        return islice(iter(loader), loader.batches_per_epoch)

    return batches


def check_val_shards(cfg: WebDatasetConfig) -> None:
    """Now, not at the first validation after a stretch of training: the held-out shards
    exist and give at least one batch (reading stops at the first)."""
    try:
        batches = build_val_shard_batches(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if next(iter(batches), None) is None:
        raise ConfigError(f"data.val_shards={cfg.val_shards!r} holds no usable sample "
                          f"(skipped: {dict(batches.skipped)}); fix those shards, or set "
                          f"data.val_shards=null for no validation")
