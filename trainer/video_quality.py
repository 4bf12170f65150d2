"""Reconstruction quality of videos in [-1, 1]: PSNR and SSIM, averaged over frames.

Both are computed on [0, 1] pixels (data range 1), per frame, as for images. SSIM is
Wang et al. (2004) with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
population covariances and only the positions where the window fits inside the frame:
the convention of ``skimage.metrics.structural_similarity(gaussian_weights=True,
use_sample_covariance=False, data_range=1)``, which the tests check against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

SSIM_SIGMA, SSIM_TAPS, SSIM_K1, SSIM_K2 = 1.5, 11, 0.01, 0.03


def _frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) in [-1, 1] -> (B*T, C, H, W) in [0, 1], fp64 for exact sums."""
    return rearrange(video.double().clamp(-1, 1).add(1).div(2), "b c t h w -> (b t) c h w")


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) pair -> (B,) PSNR in dB, the mean over frames of each frame's PSNR
    (a perfect frame counts as 100 dB rather than infinity)."""
    x, y = _frames(reconstruction), _frames(target)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    per_frame = -10 * torch.log10(mse)
    return per_frame.view(target.shape[0], target.shape[2]).mean(1).float()


def _gaussian_window(device: torch.device) -> torch.Tensor:
    radius = SSIM_TAPS // 2
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-taps.pow(2) / (2 * SSIM_SIGMA ** 2))
    return weights / weights.sum()


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) pair -> (B,) SSIM, the mean over frames, channels and positions.

    Frames smaller than the 11-pixel window are an error: SSIM is undefined there."""
    height, width = target.shape[-2:]
    if min(height, width) < SSIM_TAPS:
        raise ValueError(f"SSIM needs frames of at least {SSIM_TAPS}x{SSIM_TAPS} pixels, "
                         f"got {height}x{width}")
    x, y = _frames(reconstruction), _frames(target)
    channels = x.shape[1]
    g = _gaussian_window(x.device)
    rows = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable, 'valid' positions only
        return F.conv2d(F.conv2d(z, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    per_frame = index.mean(dim=(1, 2, 3))
    return per_frame.view(target.shape[0], target.shape[2]).mean(1).float()

