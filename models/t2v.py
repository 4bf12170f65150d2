"""The trainable text-to-video model: text conditioner + DiT under one module.

``forward(x_t (B, C, T, H, W), t (B,), captions [B]) -> velocity (B, C, T, H, W)``.
Sampling encodes the prompts once and calls ``dit`` directly.
"""

from __future__ import annotations

import torch
from torch import nn

from models.dit import DiT
from models.init import init_parameters
from models.text import TextConditioner


class TextToVideo(nn.Module):
    def __init__(self, dit: DiT, text: TextConditioner):
        super().__init__()
        self.dit = dit
        self.text = text

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from (seed, parameter name); works after ``to_empty``."""
        init_parameters(self, seed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        context, mask = self.text(captions)
        return self.dit(x, t, context, mask)
