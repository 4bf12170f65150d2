"""Mixed precision of the training step."""

from __future__ import annotations

import torch

from trainer.config import TrainConfig


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when ``trainer.precision=bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=cfg.trainer.precision.value == "bf16")
