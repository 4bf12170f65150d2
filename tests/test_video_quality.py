import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from trainer.video_quality import psnr, ssim


def pair(seed=0, shape=(2, 3, 3, 24, 20)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) * 2 - 1
    noisy = (target + 0.2 * torch.randn(shape, generator=g)).clamp(-1, 1)
    return noisy, target


def frame01(video, b, t):
    return ((video[b, :, t].double() + 1) / 2).permute(1, 2, 0).numpy()


def test_psnr_and_ssim_match_skimage_frame_by_frame():
    noisy, target = pair()
    for b in range(2):
        ref_psnr = np.mean([peak_signal_noise_ratio(frame01(target, b, t), frame01(noisy, b, t),
                                                    data_range=1) for t in range(3)])
        ref_ssim = np.mean([structural_similarity(
            frame01(target, b, t), frame01(noisy, b, t), data_range=1, channel_axis=2,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            for t in range(3)])
        assert psnr(noisy, target)[b].item() == pytest.approx(ref_psnr, rel=1e-5)
        assert ssim(noisy, target)[b].item() == pytest.approx(ref_ssim, rel=1e-5)


def test_identical_videos_score_perfect_and_tiny_frames_are_refused():
    _, target = pair()
    assert torch.all(ssim(target, target) > 0.99999)
    assert torch.all(psnr(target, target) >= 99)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(target[..., :8, :8], target[..., :8, :8])
