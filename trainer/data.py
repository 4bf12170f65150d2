"""Datasets from the ``data`` config group."""

from __future__ import annotations

from torch.utils.data import Dataset

from data.loader import ShuffledBatches
from data.shards import ShardBatches, WebDatasetConfig, build_shard_batches
from data.synthetic import SyntheticVideos
from parallel.mesh import ParallelContext
from trainer.config import SyntheticDataConfig, TrainConfig


def build_datasets(cfg: SyntheticDataConfig | WebDatasetConfig
                   ) -> tuple[Dataset | None, Dataset | None]:
    """(train, held-out validation) map-style datasets; (None, None) for shards, which are
    streamed by ``build_train_batches`` and have no held-out split yet."""
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
