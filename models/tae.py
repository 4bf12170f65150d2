"""The Movie Gen temporal autoencoder (TAE, arXiv 2410.13720 §3): a 2.5D KL autoencoder for video.

Shapes: video (B, 3, T, H, W) in [-1, 1] <-> latent (B, C, T', H', W') with
T' = ceil(T / temporal_compression), H' = ceil(H / spatial_compression), likewise W'.
An image is a one-frame video: T = 1 -> T' = 1.

Sizes that are not multiples of the compressions are padded by replicating the last
frame (and the last row and column) before encoding; ``decode`` returns the padded size
(``temporal_compression * T'`` frames) unless ``frames`` / ``height`` / ``width`` ask
for the original ones, and ``forward`` crops its reconstruction to its input. No size
reaches a conv that it cannot pass.

Tiling (``encode`` and ``decode`` when ``tiling`` is on and the input exceeds a tile):
the encoder runs on temporal tiles of ``tile_frames`` frames without overlap, the decoder
on tiles of ``tile_frames / temporal_compression`` latent frames overlapping by
``decode_overlap_frames`` frames, blended with linear ramps; frames larger than
``spatial_tile_size`` pixels are cut into spatial tiles overlapping by
``spatial_tile_overlap`` pixels, blended the same way in both directions. Blend weights
are normalised by their sum, so they sum to one everywhere. A single tile is bitwise the
untiled result. Tolerances against the untiled result (tests/test_tae.py):

- temporal tiles: every layer but the temporal ones works per frame (group norm
  statistics included), so tiles differ only where a temporal layer's receptive field
  crosses a tile boundary (it sees replicated edge frames, and the mid-block temporal
  attention sees only its tile). On smooth video (a quarter period over 48 frames) with
  randomised temporal weights the relative L2 error is 2.2% encoding and 3.3% decoding,
  tested under 8%: a misplaced or misweighted tile shows as O(1) error. A fresh model,
  whose temporal layers are identities, tiles exactly (< 1e-5).
- spatial tiles are approximate: group-norm statistics and the spatial attention span a
  whole frame, and a tile sees only itself. Measured 9% (encoding) and 14% (decoding)
  relative error on textured frames with a fresh model, tested under 25%. That is why
  frames up to 768 px are not tiled in space by default.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.init import init_parameters
from models.tae_blocks import Decoder, Encoder


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class TAEConfig:
    """Architecture and tiling of the TAE; the model is built from these fields."""

    _target_: str = "models.tae.TemporalAutoencoder"
    in_channels: int = 3
    base_channels: int = 128
    # one entry per level; the deepest level is reached after log2(max compression) halvings
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    res_blocks: int = 2  # per level, in the encoder and in the decoder
    latent_channels: int = 16
    temporal_compression: int = 8
    spatial_compression: int = 8
    attention: bool = True  # mid-block spatial attention, then temporal attention
    attention_heads: int = 1
    norm_groups: int = 32
    latent_scale: float = 1.0  # latents are multiplied by this so the DiT sees ~unit variance
    checkpoint: str | None = None  # trained weights; the trainer loads them
    init_seed: int = 0  # initial weights when no checkpoint is loaded
    tiling: bool = True
    tile_frames: int = 32  # encoder and decoder temporal tile, in video frames
    decode_overlap_frames: int = 16
    spatial_tile_size: int = 768  # pixels; larger frames are cut into tiles
    spatial_tile_overlap: int = 128

    def __post_init__(self) -> None:
        # Hydra passes a ListConfig; the model wants plain ints
        self.channel_multipliers = [int(m) for m in self.channel_multipliers]
        for name in ("in_channels", "base_channels", "res_blocks", "latent_channels",
                     "temporal_compression", "spatial_compression", "attention_heads",
                     "norm_groups", "tile_frames", "spatial_tile_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"autoencoder.{name}={getattr(self, name)} must be positive")
        if not self.channel_multipliers or min(self.channel_multipliers) <= 0:
            raise ValueError(f"autoencoder.channel_multipliers={self.channel_multipliers} "
                             f"must be a non-empty list of positive ints")
        if not self.latent_scale > 0:
            raise ValueError(f"autoencoder.latent_scale={self.latent_scale} must be positive")
        for name in ("temporal_compression", "spatial_compression"):
            if not _is_power_of_two(getattr(self, name)):
                raise ValueError(f"autoencoder.{name}={getattr(self, name)} must be a power "
                                 f"of two: each level transition halves the size")
        halvings = int(math.log2(max(self.temporal_compression, self.spatial_compression)))
        if len(self.channel_multipliers) != halvings + 1:
            raise ValueError(
                f"autoencoder.channel_multipliers={self.channel_multipliers} has "
                f"{len(self.channel_multipliers)} levels, but compressions "
                f"{self.temporal_compression}x (time) / {self.spatial_compression}x (space) "
                f"need {halvings} halvings between {halvings + 1} levels; give "
                f"{halvings + 1} multipliers")
        for m in self.channel_multipliers:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"autoencoder.norm_groups={self.norm_groups} does not divide "
                                 f"the {self.base_channels * m} channels of a level "
                                 f"(base_channels={self.base_channels} x {m})")
        top = self.base_channels * self.channel_multipliers[-1]
        if self.attention and top % self.attention_heads:
            raise ValueError(f"autoencoder.attention_heads={self.attention_heads} does not "
                             f"divide the {top} channels of the mid block")
        self._check_tile("tile_frames", "decode_overlap_frames", self.temporal_compression)
        self._check_tile("spatial_tile_size", "spatial_tile_overlap", self.spatial_compression)

    def _check_tile(self, tile_key: str, overlap_key: str, compression: int) -> None:
        tile, overlap = getattr(self, tile_key), getattr(self, overlap_key)
        for key, value in ((tile_key, tile), (overlap_key, overlap)):
            if value % compression:
                raise ValueError(f"autoencoder.{key}={value} must be a multiple of the "
                                 f"compression {compression} so tiles cut between latents")
        if not 0 <= overlap < tile:
            raise ValueError(f"autoencoder.{overlap_key}={overlap} must be >= 0 and smaller "
                             f"than autoencoder.{tile_key}={tile}")


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of tiles of ``tile`` covering [0, size), neighbours sharing ``overlap``.

    The last tile may be shorter, but always longer than the overlap.
    """
    if size <= tile:
        return [(0, size)]
    return [(start, min(start + tile, size)) for start in range(0, size - overlap, tile - overlap)]


def ramp(length: int, head: int, tail: int) -> torch.Tensor:
    """Blend weights (length,): rising linearly over the first ``head`` entries, falling over
    the last ``tail``, 1 between. A tail and the next tile's head sum to one."""
    weights = torch.ones(length)
    if head:
        weights[:head] = (torch.arange(head) + 0.5) / head
    if tail:
        weights[-tail:] = torch.minimum(weights[-tail:], (torch.arange(tail, 0, -1) - 0.5) / tail)
    return weights


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                tiles: tuple[tuple[int, int], ...], out_channels: int,
                out_size: tuple[int, int, int]) -> torch.Tensor:
    """``fn`` over overlapping (T, H, W) tiles of x (B, C, T, H, W), blended into
    (B, out_channels, *out_size).

    ``tiles`` gives (tile, overlap) per axis in x's units; ``fn`` must scale every axis
    by out_size / x's size exactly at tile boundaries. Overlaps are blended with linear
    ramps normalised by their sum; ``fn`` only ever sees one tile, so memory grows with
    the tile, not with x (apart from the output itself).
    """
    in_size = x.shape[2:]
    spans, out_spans, weights = [], [], []
    for n, out_n, (tile, overlap) in zip(in_size, out_size, tiles, strict=True):
        axis = tile_spans(n, tile, overlap)
        out_axis = [(start * out_n // n, end * out_n // n) for start, end in axis]
        spans.append(axis)
        out_spans.append(out_axis)
        weights.append([
            ramp(end - start,
                 head=out_axis[k - 1][1] - start if k > 0 else 0,
                 tail=end - out_axis[k + 1][0] if k + 1 < len(out_axis) else 0).to(x.device)
            for k, (start, end) in enumerate(out_axis)])
    # fp32 accumulation keeps the blend weights summing to one under bf16
    out = torch.zeros(x.shape[0], out_channels, *out_size, device=x.device)
    total = torch.zeros(out_size, device=x.device)
    for k_t, k_h, k_w in itertools.product(*(range(len(axis)) for axis in spans)):
        (t0, t1), (h0, h1), (w0, w1) = spans[0][k_t], spans[1][k_h], spans[2][k_w]
        (u0, u1), (v0, v1), (s0, s1) = out_spans[0][k_t], out_spans[1][k_h], out_spans[2][k_w]
        weight = (weights[0][k_t][:, None, None] * weights[1][k_h][None, :, None]
                  * weights[2][k_w][None, None, :])
        out[:, :, u0:u1, v0:v1, s0:s1] += fn(x[:, :, t0:t1, h0:h1, w0:w1]) * weight
        total[u0:u1, v0:v1, s0:s1] += weight
    return (out / total).to(x.dtype)


class TemporalAutoencoder(nn.Module):
    """The TAE. Built from the fields of :class:`TAEConfig` as keyword arguments (that is how
    Hydra instantiates ``_target_``): ``TemporalAutoencoder(**fields)``.

    Initialised from (``init_seed``, parameter name) unless built on the meta device, where
    the trainer materialises it (models/init.py).
    """

    trainable = True

    def __init__(self, **fields):
        super().__init__()
        self.cfg = cfg = TAEConfig(**fields)
        channels = [cfg.base_channels * m for m in cfg.channel_multipliers]
        time_halvings = int(math.log2(cfg.temporal_compression))
        space_halvings = int(math.log2(cfg.spatial_compression))
        shared = dict(channels=channels, res_blocks=cfg.res_blocks,
                      latent_channels=cfg.latent_channels, attention=cfg.attention,
                      heads=cfg.attention_heads, groups=cfg.norm_groups)
        self.encoder = Encoder(cfg.in_channels, space_downs=space_halvings,
                               time_downs=time_halvings, **shared)
        self.decoder = Decoder(cfg.in_channels, space_ups=space_halvings,
                               time_ups=time_halvings, **shared)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights(cfg.init_seed)

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init from (seed, parameter name); works after ``to_empty``."""
        init_parameters(self, seed)

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def temporal_compression(self) -> int:
        return self.cfg.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.cfg.spatial_compression

    @property
    def compressions(self) -> tuple[int, int, int]:
        """Compression along (T, H, W)."""
        sc = self.spatial_compression
        return self.temporal_compression, sc, sc

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a frames x height x width video."""
        if min(frames, height, width) <= 0:
            raise ValueError(f"video size {frames}x{height}x{width} (frames x height x width) "
                             f"must be positive")
        sizes = (frames, height, width)
        return (self.latent_channels,
                *(math.ceil(n / f) for n, f in zip(sizes, self.compressions, strict=True)))

    def _pad(self, video: torch.Tensor) -> torch.Tensor:
        """Replicate the last frame, row and column up to multiples of the compressions."""
        if video.ndim != 5 or video.shape[1] != self.cfg.in_channels:
            raise ValueError(f"the TAE takes video (B, {self.cfg.in_channels}, T, H, W) "
                             f"(autoencoder.in_channels={self.cfg.in_channels}); got shape "
                             f"{tuple(video.shape)}")
        latent_size = self.latent_shape(*video.shape[2:])[1:]
        t, h, w = (n * f - size for n, f, size in zip(latent_size, self.compressions,
                                                       video.shape[2:], strict=True))
        return F.pad(video, (0, w, 0, h, 0, t), mode="replicate") if t or h or w else video

    def _encoder_tiles(self) -> tuple[tuple[int, int], ...]:
        cfg = self.cfg
        space = (cfg.spatial_tile_size, cfg.spatial_tile_overlap)
        return (cfg.tile_frames, 0), space, space

    def _decoder_tiles(self) -> tuple[tuple[int, int], ...]:
        cfg = self.cfg
        tc, sc = self.temporal_compression, self.spatial_compression
        space = (cfg.spatial_tile_size // sc, cfg.spatial_tile_overlap // sc)
        return (cfg.tile_frames // tc, cfg.decode_overlap_frames // tc), space, space

    def _use_tiles(self, size: torch.Size, tiles: tuple[tuple[int, int], ...],
                   tiled: bool | None) -> bool:
        if tiled is not None:
            return tiled
        return self.cfg.tiling and any(n > tile for n, (tile, _) in zip(size, tiles, strict=True))

    def encode_distribution(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar), each (B, C, T', H', W'), untiled (training)."""
        mean, logvar = self.encoder(self._pad(video)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> posterior mean x latent_scale (B, C, T', H', W').

        ``tiled``: None tiles when ``tiling`` is on and the video exceeds a tile; True or
        False force it.
        """
        x = self._pad(video)
        c = self.latent_channels
        if not self._use_tiles(x.shape[2:], self._encoder_tiles(), tiled):
            return self.encoder(x)[:, :c] * self.cfg.latent_scale
        out_size = self.latent_shape(*x.shape[2:])[1:]
        mean = tiled_apply(lambda tile: self.encoder(tile)[:, :c], x, self._encoder_tiles(),
                           c, out_size)
        return mean * self.cfg.latent_scale

    def decode(self, latent: torch.Tensor, frames: int | None = None, height: int | None = None,
               width: int | None = None, tiled: bool | None = None) -> torch.Tensor:
        """Latent (B, C, T', H', W') -> video (B, 3, frames, height, width).

        Each size defaults to compression x latent size; a given one must round up to the
        latent size (the padded video's extra frames, rows, columns are cropped).
        """
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"the TAE decodes latents (B, {self.latent_channels}, T', H', W') "
                             f"(autoencoder.latent_channels={self.latent_channels}); got shape "
                             f"{tuple(latent.shape)}")
        z = latent / self.cfg.latent_scale
        out_size = tuple(n * f for n, f in zip(z.shape[2:], self.compressions, strict=True))
        if self._use_tiles(z.shape[2:], self._decoder_tiles(), tiled):
            video = tiled_apply(self.decoder, z, self._decoder_tiles(), self.cfg.in_channels,
                                out_size)
        else:
            video = self.decoder(z)
        return self._crop(video, z.shape[2:], (frames, height, width))

    def _crop(self, video: torch.Tensor, latent_size: torch.Size,
              wanted: tuple[int | None, ...]) -> torch.Tensor:
        """Crop a decoded video to the wanted (frames, height, width); None keeps an axis."""
        crop = []
        for axis, n, size, factor in zip(("frames", "height", "width"), latent_size, wanted,
                                         self.compressions, strict=True):
            if size is None:
                size = n * factor
            elif math.ceil(size / factor) != n:
                raise ValueError(f"decode({axis}={size}) does not fit a latent of {n} along "
                                 f"that axis: it decodes to {(n - 1) * factor + 1}.."
                                 f"{n * factor} {axis}")
            crop.append(size)
        return video[:, :, :crop[0], :crop[1], :crop[2]]

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: video (B, 3, T, H, W) -> (reconstruction (B, 3, T, H, W), mean,
        logvar (B, C, T', H', W')), decoding z = mean + std * noise. ``noise`` (shaped like
        mean) is drawn from ``generator`` (on the video's device) unless given: a
        data-parallel run can draw it for the global batch and pass each rank its rows.
        Untiled; the latent is not scaled by latent_scale."""
        mean, logvar = self.encode_distribution(video)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device,
                                dtype=mean.dtype)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} does not match the "
                             f"posterior's {tuple(mean.shape)}")
        z = mean + torch.exp(0.5 * logvar) * noise
        reconstruction = self._crop(self.decoder(z), z.shape[2:], tuple(video.shape[2:]))
        return reconstruction, mean, logvar
