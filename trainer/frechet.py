"""Fréchet distance between two sets of videos on a pluggable feature extractor.

No pretrained video network can be downloaded here, so the features are what can be
built honestly: a fixed, seeded random projection of pooled pixels (any run), or the
run's own trained TAE encoder (a run with a TAE). A user with local weights of a real
extractor (I3D, a torchvision or open_clip model) passes ``module:function``, a function
from videos (N, 3, T, H, W) in [-1, 1] to features (N, D). The label travels into every
table, since distances on different features are not comparable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ConfigError

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

# Videos are pooled to this (T, H, W) before projecting, so the projection (and with it
# the distance) means the same for runs of any resolution or length.
POOLED_SIZE = (8, 16, 16)
PROJECTION_DIMS = 64
PROJECTION_SEED = 0


@dataclass
class FeatureExtractor:
    label: str           # what the features are, for tables
    features: FeatureFn  # (N, 3, T, H, W) in [-1, 1] -> (N, D)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Features (N, D) and (M, D) -> the Fréchet distance of Gaussians fitted to each:
    |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½), in fp64 (the
    symmetric form needs only eigendecompositions of symmetric matrices)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"Fréchet distance needs two (N >= 2, D) feature sets of one D; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).view(a.shape[1], -1), torch.cov(b.T).view(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(distance.clamp_min(0))


def random_projection_features(seed: int = PROJECTION_SEED,
                               dims: int = PROJECTION_DIMS) -> FeatureFn:
    """Videos pooled to ``POOLED_SIZE`` and projected by a fixed Gaussian matrix drawn
    from ``seed``: (N, 3, T, H, W) -> (N, dims)."""
    inputs = 3 * POOLED_SIZE[0] * POOLED_SIZE[1] * POOLED_SIZE[2]
    matrix = torch.randn(inputs, dims, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64) / inputs ** 0.5

    def features(videos: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool3d(videos.double().cpu(), POOLED_SIZE)
        return pooled.flatten(1) @ matrix

    return features


def autoencoder_features(autoencoder: nn.Module, batch: int = 8) -> FeatureFn:
    """The trained encoder's latent, per channel its mean and standard deviation over
    positions: (N, 3, T, H, W) -> (N, 2C), encoded ``batch`` videos at a time."""
    device = next(autoencoder.parameters()).device

    @torch.no_grad()
    def features(videos: torch.Tensor) -> torch.Tensor:
        latent = torch.cat([autoencoder.encode(chunk.to(device)).flatten(2).double().cpu()
                            for chunk in videos.split(batch)])
        return torch.cat([latent.mean(2), latent.std(2)], dim=1)

    return features


def feature_extractor(spec: str, autoencoder: nn.Module) -> FeatureExtractor:
    """``features=`` of the evaluate CLI: auto (the run's TAE if it has one, else the
    random projection), random_projection, autoencoder, or ``module:function``."""
    has_tae = bool(getattr(autoencoder, "trainable", False))
    if spec == "auto":
        spec = "autoencoder" if has_tae else "random_projection"
    if spec == "random_projection":
        return FeatureExtractor(
            f"random projection (seed {PROJECTION_SEED}, {PROJECTION_DIMS} dims) of pixels "
            f"pooled to {'x'.join(map(str, POOLED_SIZE))}", random_projection_features())
    if spec == "autoencoder":
        if not has_tae:
            raise ConfigError("features=autoencoder needs a run with a trained TAE; this "
                              "run's autoencoder is fixed (pixels). Use "
                              "features=random_projection or module:function")
        channels = autoencoder.latent_channels
        return FeatureExtractor(f"the run's TAE encoder (per-channel mean and std, "
                                f"{2 * channels} dims)", autoencoder_features(autoencoder))
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"features={spec!r} is none of auto, random_projection, "
                          f"autoencoder or module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"features={spec}: cannot load {function_name} from "
                          f"{module_name} ({error})") from error
    return FeatureExtractor(f"{spec} (user extractor)", function)
