"""Datasets from the ``data`` config group."""

from __future__ import annotations

from torch.utils.data import Dataset

from data.synthetic import SyntheticVideos
from trainer.config import SyntheticDataConfig


def build_datasets(cfg: SyntheticDataConfig) -> tuple[Dataset, Dataset]:
    """(train, held-out validation) datasets."""
    common = dict(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps,
                  seed=cfg.seed)
    return (SyntheticVideos(cfg.num_samples, split="train", **common),
            SyntheticVideos(cfg.val_samples, split="val", **common))
