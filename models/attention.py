"""Attention modules and the one seam through which the parallel layer swaps the kernel.

Every attention module calls ``self.attention_fn(q, k, v, mask)`` with q of shape
(B, heads, Lq, head_dim), k and v of shape (B, heads, Lk, head_dim) and an optional
boolean key mask of shape (B, 1, 1, Lk) (True = attend). The default is plain SDPA;
``parallel/`` replaces the attribute on self-attention modules with context-parallel
variants. The model itself never knows it is sharded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.rope import apply_rotary

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full bidirectional attention: (B, h, Lq, d), (B, h, Lk, d) x2 -> (B, h, Lq, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention projections without biases, and the swappable kernel."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.attention_fn: AttentionFn = sdpa_attention

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # Split by head size, not head count: under tensor parallelism a rank holds a
        # subset of the heads.
        return rearrange(x, "b l (h d) -> b h l d", d=self.head_dim)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(rearrange(x, "b h l d -> b l (h d)"))


class SelfAttention(Attention):
    """Bidirectional self-attention: (B, L, D), optional key mask (B, 1, 1, L) and rotary
    tables (cos, sin), each (L, head_dim / 2) -> (B, L, D)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = (self.split_heads(w(x)) for w in (self.wq, self.wk, self.wv))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.merge_heads(self.attention_fn(q, k, v, mask))


class CrossAttention(Attention):
    """Queries from the video tokens, keys/values from the text context.

    x: (B, L, D), context: (B, Lc, D), context_mask: (B, Lc) bool (True = real token)
    -> (B, L, D).
    """

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.split_heads(self.wq(x))
        k, v = self.split_heads(self.wk(context)), self.split_heads(self.wv(context))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        return self.merge_heads(self.attention_fn(q, k, v, mask))


class SwiGLU(nn.Module):
    """Llama-style gated FFN without biases: (B, L, D) -> (B, L, D)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
