"""3D rotary position embedding (RoPE) for video tokens.

Each head's channels are split into three groups, one per axis (T, H, W); a group's
channel pairs are rotated by the token's index along that axis times the pair's
frequency (Su et al., RoFormer, arXiv 2104.09864, extended to three axes as video DiTs
do). The dot product of a rotated query and key then depends on their offset along every
axis, so attention starts out knowing which patches are neighbours.
"""

from __future__ import annotations

import torch
from torch import nn


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (T, H, W), each even; H and W get equal shares, T the rest."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dimension >= 6, got {head_dim}")
    spatial = head_dim // 6 * 2
    return head_dim - 2 * spatial, spatial, spatial


def axis_frequencies(dim: int, theta: float) -> torch.Tensor:
    """(dim // 2,) rotation frequencies of one axis, theta^(-2j/dim), in float64."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rotary_1d(length: int, head_dim: int, theta: float = 10000.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of a token sequence, each (length, head_dim // 2): every channel pair
    of a head rotated by the token's index (RoFormer's 1D RoPE)."""
    angles = (torch.arange(length, dtype=torch.float64)[:, None]
              * axis_frequencies(head_dim, theta)[None])
    return torch.cos(angles).float(), torch.sin(angles).float()


class RotaryEmbedding3D(nn.Module):
    """Grid (Tp, Hp, Wp) -> (cos, sin), each (Tp*Hp*Wp, head_dim // 2), t-major like the
    patch tokens. No parameters: the tables are a function of the grid."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        coords = torch.cartesian_prod(*(torch.arange(n, dtype=torch.float64) for n in grid))
        coords = coords.reshape(-1, 3)  # a 1-axis product comes back flat
        angles = torch.cat([coords[:, axis, None] * axis_frequencies(dim, self.theta)[None]
                            for axis, dim in enumerate(axis_dims(self.head_dim))], dim=1)
        return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, heads, L, d) by the angles whose cos and
    sin are (L, d/2)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
