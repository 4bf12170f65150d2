"""Building blocks of the 2.5D temporal autoencoder (arXiv 2410.13720 §3) and its coders.

Every tensor here is a video feature map (B, C, T, H, W). A spatial layer acts on each
frame alone (a Conv3d with a 1×k×k kernel, zero padding in space; group norm statistics
per frame); a temporal layer acts on each pixel's time series alone (kernel 3 in time,
replicate padding). Every k×k spatial conv is followed by a temporal conv and every
spatial attention by a temporal attention; 1×1 channel projections are not.

Every temporal layer is a residual whose learned part starts at zero, so a fresh model is
an image autoencoder applied frame by frame, with pairwise frame means where time is
downsampled and frame repeats where it is upsampled. ``x + conv(x)`` is the same function
class as a plain temporal conv whose centre tap starts at the identity; the residual form
keeps initialisation a pure (seed, name) rule: the ``zero_init`` patterns of models/init.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.attention import SelfAttention


def pad_time(x: torch.Tensor, before: int = 1, after: int = 1) -> torch.Tensor:
    """Replicate-pad the time axis of (B, C, T, H, W)."""
    return F.pad(x, (0, 0, 0, 0, before, after), mode="replicate")


class FrameGroupNorm(nn.GroupNorm):
    """Group norm with statistics per frame, (B, C, T, H, W) -> same.

    Statistics over all frames would couple every frame of a clip to every other, so a
    frame's code would depend on the clip's length and tiles would disagree with the
    whole; per frame, only the temporal layers see other frames.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        return rearrange(super().forward(frames), "(b t) c h w -> b c t h w", b=x.shape[0])


class TemporalConv(nn.Module):
    """Residual temporal conv, kernel 3, replicate padding: (B, C, T, H, W) -> same."""

    zero_init = ("conv.weight",)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(pad_time(x))


class Conv2p5d(nn.Module):
    """A per-frame k×k conv then a temporal conv: (B, Cin, T, H, W) -> (B, Cout, T, H/s, W/s).

    With stride s = 2 this is the spatial downsampler (H and W even).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.spatial = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, stride, stride),
                                 padding=(0, 1, 1))
        self.temporal = TemporalConv(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.spatial(x))


class TemporalDownsample(nn.Module):
    """Stride-2 temporal conv (kernel 3, replicate padding): (B, C, T, H, W) -> (B, C, T/2, H, W).

    T must be even. The conv is a residual over the mean of each frame pair (2i, 2i+1),
    so a fresh one averages pairs of frames.
    """

    zero_init = ("conv.weight",)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair_means = x.unflatten(2, (-1, 2)).mean(3)
        return pair_means + self.conv(pad_time(x))


class SpatialUpsample(nn.Module):
    """Nearest-neighbour ×2 in H and W, then a 2.5D conv: (B, C, T, H, W) -> (B, C, T, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2p5d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class TemporalUpsample(nn.Module):
    """Nearest-neighbour ×2 in T, then a temporal conv: (B, C, T, H, W) -> (B, C, 2T, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = TemporalConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.repeat_interleave(2, dim=2))


class ResBlock(nn.Module):
    """(norm, SiLU, 2.5D conv) twice plus a skip: (B, Cin, T, H, W) -> (B, Cout, T, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = Conv2p5d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = Conv2p5d(out_channels, out_channels)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv3d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Residual self-attention among the pixels of each frame: (B, C, T, H, W) -> same."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels, eps=1e-6)
        self.attn = SelfAttention(channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")
        out = rearrange(self.attn(tokens), "(b t) (h w) c -> b c t h w", b=b, h=h, w=w)
        return x + out


class TemporalAttention(nn.Module):
    """Residual self-attention along time at each pixel: (B, C, T, H, W) -> same."""

    zero_init = ("attn.wo.weight",)

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels, eps=1e-6)
        self.attn = SelfAttention(channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b h w) t c")
        out = rearrange(self.attn(tokens), "(b h w) t c -> b c t h w", b=b, h=h, w=w)
        return x + out


class MidBlock(nn.Module):
    """ResBlock, [spatial then temporal attention], ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool, heads: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups)
        self.attention = (nn.Sequential(SpatialAttention(channels, heads, groups),
                                        TemporalAttention(channels, heads, groups))
                          if attention else nn.Identity())
        self.res2 = ResBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attention(self.res1(x)))


class Encoder(nn.Module):
    """Video (B, Cin, T, H, W) -> posterior moments (B, 2·latent, T/2^td, H/2^sd, W/2^sd)
    with td = time_downs, sd = space_downs.

    ``channels[i]`` is level i's width; between level i and i + 1 space is halved when
    i < space_downs and time when i < time_downs (space first, so the temporal
    conv runs at the smaller size). T and H, W must be divisible by the compressions.
    """

    def __init__(self, in_channels: int, channels: list[int], res_blocks: int,
                 latent_channels: int, space_downs: int, time_downs: int, attention: bool,
                 heads: int, groups: int):
        super().__init__()
        self.conv_in = Conv2p5d(in_channels, channels[0])
        self.levels = nn.ModuleList()
        width = channels[0]
        for i, level_width in enumerate(channels):
            blocks: list[nn.Module] = []
            for _ in range(res_blocks):
                blocks.append(ResBlock(width, level_width, groups))
                width = level_width
            if i < space_downs:
                blocks.append(Conv2p5d(width, width, stride=2))
            if i < time_downs:
                blocks.append(TemporalDownsample(width))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = MidBlock(width, groups, attention, heads)
        self.norm_out = FrameGroupNorm(groups, width, eps=1e-6)
        self.conv_out = Conv2p5d(width, 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """Latent (B, latent, T', H', W') -> video (B, Cout, T'·2^tu, H'·2^su, W'·2^su) with
    tu = time_ups, su = space_ups.

    The encoder's mirror: levels from the deepest up, time upsampled before space.
    """

    def __init__(self, out_channels: int, channels: list[int], res_blocks: int,
                 latent_channels: int, space_ups: int, time_ups: int, attention: bool,
                 heads: int, groups: int):
        super().__init__()
        width = channels[-1]
        self.conv_in = Conv2p5d(latent_channels, width)
        self.mid = MidBlock(width, groups, attention, heads)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(channels))):
            blocks: list[nn.Module] = []
            for _ in range(res_blocks):
                blocks.append(ResBlock(width, channels[i], groups))
                width = channels[i]
            if 0 < i <= time_ups:
                blocks.append(TemporalUpsample(width))
            if 0 < i <= space_ups:
                blocks.append(SpatialUpsample(width))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = FrameGroupNorm(groups, width, eps=1e-6)
        self.conv_out = Conv2p5d(width, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))
