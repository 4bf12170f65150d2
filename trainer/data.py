"""Datasets from the ``data`` config group."""

from __future__ import annotations

from torch.utils.data import Dataset

from data.loader import ShuffledBatches
from data.synthetic import SyntheticVideos
from parallel.mesh import ParallelContext
from trainer.config import SyntheticDataConfig, TrainConfig


def build_datasets(cfg: SyntheticDataConfig) -> tuple[Dataset, Dataset]:
    """(train, held-out validation) datasets."""
    common = dict(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps,
                  seed=cfg.seed)
    return (SyntheticVideos(cfg.num_samples, split="train", **common),
            SyntheticVideos(cfg.val_samples, split="val", **common))


def build_train_batches(cfg: TrainConfig, train_data: Dataset,
                        ctx: ParallelContext) -> ShuffledBatches:
    """This rank's slice of every global batch: split by the *data-parallel* rank only, so
    all cp/tp ranks of one replica get the same samples."""
    return ShuffledBatches(train_data, cfg.recipe.batch_size // ctx.dp_size, cfg.trainer.seed,
                           ctx.dp_rank, ctx.dp_size)
