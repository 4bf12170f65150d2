"""Text conditioning: encoders behind one interface, projected, concatenated (arXiv 2410.13720 §1).

An encoder maps captions to tokens: ``encode(captions) -> (tokens (B, L, E), mask (B, L))``
with ``mask`` True on real tokens, and exposes ``dim`` (E) and ``trainable``. The embedded
default is a byte-level (ByT5-style) tokenizer with a small transformer, so nothing is
downloaded; its weights are initialised by ``models.init`` from (seed, parameter name).
Frozen pretrained encoders (T5/UL2, ByT5, CLIP, the packaged MiniLM) live in
``models.pretrained_text``. ``TextConditioner`` gives every encoder its own Linear +
LayerNorm into the DiT width and concatenates their tokens along the sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import SelfAttention, SwiGLU
from models.pretrained_text import EncoderSettingError
from models.rope import rotary_1d

POSITIONS = ("absolute", "rope")


class ByteTokenizer:
    """UTF-8 bytes offset by the three ByT5 specials (pad 0, eos 1, unk 2), eos-terminated."""

    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + offset

    def __init__(self, max_length: int):
        if max_length < 2:
            raise EncoderSettingError("max_length", max_length, "must be at least 2 (bytes + eos)")
        self.max_length = max_length

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> ids (B, max_length) long, mask (B, max_length) bool."""
        ids = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        for row, caption in enumerate(captions):
            body = [b + self.offset for b in caption.encode("utf-8")][: self.max_length - 1]
            ids[row, : len(body) + 1] = torch.tensor(body + [self.eos_id])
        return ids, ids != self.pad_id


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer with a key padding mask: (B, L, E)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn = SwiGLU(dim, ffn_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask[:, None, None, :], rope=rope)
        return x + self.ffn(self.ffn_norm(x))


class ByteTextEncoder(nn.Module):
    """Byte-level encoder, the embedded default: captions -> (B, L, dim), mask.

    ``trainable=False`` keeps it at its seeded random init, a fixed random-feature encoder
    that, like a frozen pretrained one, cannot collapse captions onto one context.
    ``shard`` (frozen only) tells the parallel layer to FSDP-shard it or keep it whole.
    ``positions``: "absolute" adds a position table to the byte embeddings; "rope" rotates
    attention queries and keys instead (relative positions, as ByT5's T5 biases are), so a
    word's output depends on its neighbours, not on where in the caption it starts. Frozen
    at random init, an absolute table as large as the byte embeddings makes one word at two
    offsets as far apart as two words at one offset (cosine ~0.6 for both), and the DiT
    has to learn each word once per place it can appear.
    """

    def __init__(self, dim: int, depth: int, heads: int, ffn_dim: int, max_length: int,
                 trainable: bool = True, shard: bool = True, positions: str = "absolute"):
        super().__init__()
        for key, value, least in (("dim", dim, 1), ("heads", heads, 1), ("ffn_dim", ffn_dim, 1),
                                  ("depth", depth, 0)):
            if value < least:
                raise EncoderSettingError(key, value, f"must be >= {least}")
        if dim % heads:
            raise EncoderSettingError("dim", dim, f"is not divisible by heads={heads}")
        if positions not in POSITIONS:
            raise EncoderSettingError("positions", positions, f"must be one of {POSITIONS}")
        if positions == "rope" and (dim // heads) % 2:
            raise EncoderSettingError("positions", positions,
                                      f"needs an even head dimension, got dim / heads = "
                                      f"{dim // heads}")
        self.dim, self.heads = dim, heads
        self.trainable, self.shard = trainable, shard
        self.tokenizer = ByteTokenizer(max_length)
        self.embed = nn.Embedding(ByteTokenizer.vocab_size, dim)
        self.pos = nn.Parameter(torch.empty(max_length, dim)) if positions == "absolute" else None
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        ids, mask = ids.to(self.embed.weight.device), mask.to(self.embed.weight.device)
        x = self.embed(ids)
        rope = None
        if self.pos is None:
            rope = tuple(table.to(x.device)
                         for table in rotary_1d(ids.shape[1], self.dim // self.heads))
        else:
            x = x + self.pos[None, : ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask, rope)
        return self.norm(x), mask


class TextConditioner(nn.Module):
    """Several encoders -> one cross-attention context, in two steps so that the frozen
    encoders' outputs can be cached: ``encode`` runs the encoders, ``project`` maps each
    to the width and concatenates. ``forward(captions) = project(encode(captions))``:
    captions (B strings) -> context (B, sum_i L_i, width), mask (B, sum_i L_i) bool;
    ``forward(encoded)`` projects already-encoded (cached) text.
    """

    def __init__(self, encoders: dict[str, nn.Module], width: int):
        super().__init__()
        if not encoders:
            raise ValueError("text.encoders is empty: configure at least one text encoder")
        self.encoders = nn.ModuleDict(encoders)
        for encoder in encoders.values():
            encoder.requires_grad_(encoder.trainable)
        self.projections = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(enc.dim, width, bias=False), nn.LayerNorm(width))
            for name, enc in encoders.items()})

    def encode(self, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """captions (B) -> {name: (states (B, L_i, E_i), mask (B, L_i) bool)}; frozen
        encoders run without grad."""
        encoded = {}
        for name, encoder in self.encoders.items():
            if encoder.trainable:
                encoded[name] = encoder.encode(captions)
            else:
                with torch.no_grad():
                    encoded[name] = encoder.encode(captions)
        return encoded

    def project(self, encoded: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """{name: (states, mask)} -> context (B, sum_i L_i, width), mask (B, sum_i L_i)."""
        if encoded.keys() != self.encoders.keys():
            raise ValueError(f"encoded text has encoders {sorted(encoded)} but the model "
                             f"was built with {sorted(self.encoders)}")
        tokens, masks = [], []
        for name, projection in self.projections.items():
            states, mask = encoded[name]
            # Cast to the projection's compute dtype: bf16 under FSDP mixed precision,
            # while pretrained encoders and caches hand over fp32.
            tokens.append(projection(states.to(projection[0].weight.dtype)))
            masks.append(mask)
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)

    def forward(self, text: list[str] | dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """captions, or their cached ``encode`` output -> context, mask. Cached encodings
        go through this call too, so hooks on the module (FSDP's gathers) still run."""
        return self.project(text if isinstance(text, dict) else self.encode(text))
