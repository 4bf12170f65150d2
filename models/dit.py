"""The Movie Gen video DiT (arXiv 2410.13720 §1), a plain nn.Module.

A Llama-style non-causal block: RMSNorm -> self-attention -> cross-attention to text ->
RMSNorm -> SwiGLU, no biases. Time enters through adaLN-zero in PixArt-alpha's shared
form (one time MLP for the whole stack plus a learnable per-block table), which keeps the
48/6144/16384/48 configuration at ~29B parameters as the paper counts it. Learnable
factorised T/H/W position tables are added to the input of every block; ``rope=true`` also
rotates self-attention's queries and keys by their T/H/W indices (3D RoPE).

Shapes: latent x (B, C, T, H, W), t (B,) in [0, 1] (0 = noise, 1 = data),
context (B, Lc, D) already projected to the model width, context_mask (B, Lc) bool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from models.attention import CrossAttention, SelfAttention, SwiGLU
from models.init import init_parameters
from models.rope import RotaryEmbedding3D

POSITION_INITS = ("sincos", "normal")
PREDICTIONS = ("velocity", "data")


@dataclass
class DiTConfig:
    """Architecture of the DiT. Position tables are sized in patches, not latent pixels."""

    width: int = 128
    depth: int = 4
    heads: int = 4
    ffn_dim: int = 512
    in_channels: int = 16
    patch_t: int = 1
    patch_h: int = 2
    patch_w: int = 2
    max_patches_t: int = 32
    max_patches_h: int = 48
    max_patches_w: int = 48
    time_freq_dim: int = 256
    norm_eps: float = 1e-6
    # How the T/H/W tables start: "normal" (random, std 0.02) or "sincos" (each axis owns
    # a third of the channels with sines and cosines of its index, so their sum is a 3D
    # sinusoidal embedding and neighbouring patches start out similar). On the synthetic
    # set sincos tables, added before every block, held the loss on a plateau for the
    # first 200 steps, so random is the default; RoPE is what gives attention geometry.
    position_init: str = "normal"
    # Also rotate self-attention queries and keys by their T/H/W indices (3D RoPE), so
    # attention scores depend on relative position; the tables stay.
    rope: bool = False
    rope_theta: float = 10000.0
    # Also add an MLP of the masked mean of the text context to the time vector that drives
    # adaLN (Stable Diffusion 3's pooled-text path, arXiv 2403.03206), so every token's
    # norm shift/scale/gates depend on the whole caption, not only on what cross-attention
    # picks out for it.
    text_modulation: bool = False
    # What the last layer predicts: "velocity" (v = x1 - x0 directly) or "data" (the clean
    # sample x1, turned into v = (x1 - x_t) / (1 - t) inside forward, so callers always get
    # a velocity; JiT, arXiv 2511.13720). At high noise a velocity network must copy the
    # input noise to its output, which buries the weak, consistent gradient of where the
    # object should be under per-sample noise; a data network only predicts the clip.
    prediction: str = "velocity"
    # 1 - t is clamped to at least this in that division (t = 1 is the data end).
    data_prediction_min_gap: float = 0.05

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "ffn_dim", "in_channels", "patch_t", "patch_h",
                     "patch_w", "max_patches_t", "max_patches_h", "max_patches_w",
                     "time_freq_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} is not divisible by "
                             f"model.heads={self.heads}; pick heads that divide the width")
        if self.time_freq_dim % 2:
            raise ValueError(f"model.time_freq_dim={self.time_freq_dim} must be even")
        if not 0 < self.rope_theta < math.inf:
            raise ValueError(f"model.rope_theta={self.rope_theta} must be a finite number > 0")
        if self.rope and ((self.width // self.heads) % 2 or self.width // self.heads < 6):
            raise ValueError(f"model.rope=true needs an even head dimension >= 6, but "
                             f"model.width / model.heads = {self.width // self.heads}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction={self.prediction!r} is not one of {PREDICTIONS}")
        if not 0 < self.data_prediction_min_gap <= 1:
            raise ValueError(f"model.data_prediction_min_gap={self.data_prediction_min_gap} "
                             f"must lie in (0, 1]")
        if self.position_init not in POSITION_INITS:
            raise ValueError(f"model.position_init={self.position_init!r} is not one of "
                             f"{POSITION_INITS}")

    @property
    def patch_volume(self) -> int:
        return self.patch_t * self.patch_h * self.patch_w


def patch_grid(cfg: DiTConfig, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Patch grid (Tp, Hp, Wp) of a (C, T, H, W) latent; a clear error if it does not fit."""
    channels, *sizes = latent_shape
    if channels != cfg.in_channels:
        raise ValueError(f"model.in_channels={cfg.in_channels} does not match the {channels} "
                         f"latent channels of the input; set model.in_channels={channels}")
    grid = []
    for axis, size in zip("thw", sizes, strict=True):
        patch = getattr(cfg, f"patch_{axis}")
        limit = getattr(cfg, f"max_patches_{axis}")
        if size % patch:
            raise ValueError(f"model.patch_{axis}={patch} does not divide the latent "
                             f"{axis}-size {size}")
        if size // patch > limit:
            raise ValueError(f"latent {axis}-size {size} / model.patch_{axis}={patch} = "
                             f"{size // patch} patches exceeds model.max_patches_{axis}={limit}")
        grid.append(size // patch)
    return tuple(grid)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t*1000 (the DiT convention for t in [0, 1]): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """t (B,) -> conditioning vector c (B, D)."""

    def __init__(self, freq_dim: int, width: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(features)))


def sincos_table(length: int, width: int, axis: int) -> torch.Tensor:
    """(length, width) table of axis ``axis`` (0, 1, 2 = T, H, W) of a 3D sinusoidal
    embedding: the axis's third of the channels holds sin/cos of index * frequency, the
    frequencies spaced geometrically from pi/length (a half cycle over the table) to pi/2
    (period 4 patches); the other channels are 0. Summing the three tables gives each
    patch a distinct code whose similarity falls off with distance along every axis."""
    pairs = width // 6
    table = torch.zeros(length, width)
    if pairs == 0:
        return table
    freqs = torch.logspace(math.log10(math.pi / max(length, 2)), math.log10(math.pi / 2),
                           pairs, dtype=torch.float64)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    start = axis * 2 * pairs
    table[:, start: start + pairs] = torch.sin(angles).float()
    table[:, start + pairs: start + 2 * pairs] = torch.cos(angles).float()
    return table


class PositionEmbedding(nn.Module):
    """Learnable factorised T/H/W tables: grid (Tp, Hp, Wp) -> (Tp*Hp*Wp, D), t-major."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.init = cfg.position_init
        self.t = nn.Parameter(torch.empty(cfg.max_patches_t, cfg.width))
        self.h = nn.Parameter(torch.empty(cfg.max_patches_h, cfg.width))
        self.w = nn.Parameter(torch.empty(cfg.max_patches_w, cfg.width))

    def initial_value(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The structured start of table ``name`` ("t", "h", "w"), or None for the
        default random init (``models.init``)."""
        if self.init != "sincos":
            return None
        return sincos_table(shape[0], shape[1], "thw".index(name))

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        tp, hp, wp = grid
        pos = self.t[:tp, None, None] + self.h[None, :hp, None] + self.w[None, None, :wp]
        return pos.flatten(0, 2)


class PooledTextEmbedding(nn.Module):
    """Masked mean of the context, through an MLP: (B, Lc, D), (B, Lc) -> (B, D).
    A caption with no valid token (all masked) pools to zeros."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        if context_mask is None:
            pooled = context.mean(1)
        else:
            weights = context_mask.to(context.dtype)[..., None]
            pooled = (context * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.fc2(nn.functional.silu(self.fc1(pooled)))


class DiTBlock(nn.Module):
    """One transformer block. x (B, L, D), modulation (B, 6, D) -> (B, L, D)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.width
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(d, cfg.heads)
        self.cross_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(d, cfg.heads)
        self.ffn_norm = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.ffn = SwiGLU(d, cfg.ffn_dim)
        # Per-block offset added to the shared time modulation (adaLN-single).
        self.modulation = nn.Parameter(torch.empty(6, d))

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
            self.modulation[None] + modulation).unbind(1)
        x = x + gate_a[:, None] * self.attn(modulate(self.attn_norm(x), shift_a, scale_a),
                                            rope=rope)
        x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        x = x + gate_f[:, None] * self.ffn(modulate(self.ffn_norm(x), shift_f, scale_f))
        return x


class FinalLayer(nn.Module):
    """Modulated norm + zero-initialised projection to patch values: (B, L, D) -> (B, L, P)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.modulation = nn.Parameter(torch.empty(2, cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.patch_volume * cfg.in_channels, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation[None] + c[:, None]).unbind(1)
        return self.proj(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Velocity network v(x_t, t, text): (B, C, T, H, W) -> (B, C, T, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Linear(cfg.patch_volume * cfg.in_channels, d, bias=False)
        self.pos_embed = PositionEmbedding(cfg)
        self.rope = RotaryEmbedding3D(d // cfg.heads, cfg.rope_theta) if cfg.rope else None
        self.time_embed = TimeEmbedding(cfg.time_freq_dim, d)
        self.text_embed = PooledTextEmbedding(d) if cfg.text_modulation else None
        self.time_modulation = nn.Linear(d, 6 * d, bias=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)

    # adaLN-zero: gates, shifts and scales start at 0, so every block starts as the
    # identity; cross-attention is not gated, so its output projection starts at 0.
    zero_init = ("time_modulation.weight", "blocks.*.modulation",
                 "blocks.*.cross_attn.wo.weight", "final.modulation", "final.proj.weight")

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from (seed, parameter name); works after ``to_empty``."""
        init_parameters(self, seed)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)",
                         pt=cfg.patch_t, ph=cfg.patch_h, pw=cfg.patch_w)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        cfg = self.cfg
        tp, hp, wp = grid
        return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                         t=tp, h=hp, w=wp, pt=cfg.patch_t, ph=cfg.patch_h, pw=cfg.patch_w)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        grid = patch_grid(self.cfg, tuple(x.shape[1:]))
        h = self.patch_embed(self.patchify(x))
        pos = self.pos_embed(grid)
        rope = None if self.rope is None else self.rope(grid)
        c = self.time_embed(t)
        if self.text_embed is not None:
            c = c + self.text_embed(context, context_mask)
        modulation = self.time_modulation(nn.functional.silu(c)).unflatten(1, (6, -1))
        for block in self.blocks:
            h = block(h + pos, modulation, context, context_mask, rope)
        out = self.unpatchify(self.final(h, c), grid)
        if self.cfg.prediction == "data":
            gap = (1 - t.to(out.dtype)).clamp(min=self.cfg.data_prediction_min_gap)
            out = (out - x) / gap.view(-1, *(1,) * (x.dim() - 1))
        return out
