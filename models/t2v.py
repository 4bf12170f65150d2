"""The trainable text-to-video model: text conditioner + DiT under one module.

``forward(x_t (B, C, T, H, W), t (B,), text) -> velocity (B, C, T, H, W)``, where text is
B captions or their cached encodings {name: (states (B, L, E), mask (B, L))}.
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

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                text: list[str] | dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        context, mask = self.text(text)
        return self.dit(x, t, context, mask)
