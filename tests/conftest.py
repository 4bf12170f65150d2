"""Shared helpers: tiny models and a composed config, all on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def compose_train(overrides: list[str] | None = None):
    """The composed and validated training config, as ``trainer.train`` would see it."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs, to_train_config
    from trainer.run_config import CONF_DIR

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        return to_train_config(compose("train", overrides=overrides or []))
