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

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full bidirectional attention: (B, h, Lq, d), (B, h, Lk, d) x2 -> (B, h, Lq, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention without biases: (B, L, D) -> (B, L, D)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (rearrange(w(x), "b l (h d) -> b h l d", h=self.heads)
                   for w in (self.wq, self.wk, self.wv))
        out = self.attention_fn(q, k, v, mask)
        return self.wo(rearrange(out, "b h l d -> b l (h d)"))


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from the text context.

    x: (B, L, D), context: (B, Lc, D), context_mask: (B, Lc) bool (True = real token)
    -> (B, L, D).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = rearrange(self.wq(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = (rearrange(w(context), "b l (h d) -> b h l d", h=self.heads)
                for w in (self.wk, self.wv))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = self.attention_fn(q, k, v, mask)
        return self.wo(rearrange(out, "b h l d -> b l (h d)"))


class SwiGLU(nn.Module):
    """Llama-style gated FFN without biases: (B, L, D) -> (B, L, D)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
