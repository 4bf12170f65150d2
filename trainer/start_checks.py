"""Checks a training run makes at start, for settings each group's schema accepts but the
run would trip over later: at its first validation, sample or checkpoint, after minutes
or hours of training. Each raises a ConfigError naming the key and the fix."""

from __future__ import annotations

import math
from typing import Any

import torch

from data.latent_shards import (
    CacheMismatch,
    LatentDataConfig,
    cache_manifest,
    check_cache,
    check_frozen_text,
)
from data.preference_shards import is_preference
from data.shards import WebDatasetConfig
from models.dit import patch_grid
from parallel.mesh import MeshDims
from parallel.tensor_parallel import check_heads
from trainer.config import (
    ConfigError,
    CPMode,
    RecipeConfig,
    SyntheticDataConfig,
    Task,
    TrainConfig,
)
from trainer.video_quality import SSIM_TAPS


def check_start(cfg: TrainConfig) -> None:
    check_device(cfg.trainer.device)
    check_optimizer(cfg.recipe)
    if isinstance(cfg.data, SyntheticDataConfig):
        check_synthetic(cfg.data)
    check_written_videos(cfg)


def check_synthetic(data: SyntheticDataConfig) -> None:
    for name in ("num_samples", "frames", "height", "width"):
        if getattr(data, name) < 1:
            raise ConfigError(f"data.{name}={getattr(data, name)} must be >= 1")
    if data.val_samples < 0:
        raise ConfigError(f"data.val_samples={data.val_samples} must be >= 0 (0: no "
                          f"validation)")
    if not 0 < data.fps < math.inf:
        raise ConfigError(f"data.fps={data.fps} must be a finite number > 0")


def check_optimizer(recipe: RecipeConfig) -> None:
    """What AdamW refuses only when it is built, and what would silently mean something
    else (a negative warm-up or clip norm acts as none)."""
    betas = list(recipe.betas)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"recipe.betas={betas} must be two numbers in [0, 1) (AdamW's "
                          f"moment decays, e.g. [0.9, 0.95])")
    if not 0.0 < recipe.eps < math.inf:
        raise ConfigError(f"recipe.eps={recipe.eps} must be a finite number > 0 (AdamW's "
                          f"denominator guard, e.g. 1e-8)")
    for name in ("weight_decay", "warmup_steps", "grad_clip"):
        value = getattr(recipe, name)
        if not 0 <= value < math.inf:
            raise ConfigError(f"recipe.{name}={value} must be a finite number >= 0"
                              + (" (0 turns clipping off)" if name == "grad_clip" else ""))
    if not 0.0 < recipe.t_std < math.inf:
        raise ConfigError(f"recipe.t_std={recipe.t_std} must be a finite number > 0 (the "
                          f"spread of the logit-normal timestep draw, e.g. 1)")


def check_device(device: str) -> None:
    try:
        torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"trainer.device={device!r} is not a device: "
                          f"{str(error).splitlines()[0]} (cpu, cuda, cuda:1, ...)") from None


def _size_key(cfg: TrainConfig, height: int, width: int) -> str:
    """How the user sets this size: data.sizes for shards, else data.height/data.width."""
    if hasattr(cfg.data, "sizes"):
        return f"data.sizes={cfg.data.sizes} (its {height}x{width})"
    return f"data.height={height} and data.width={width}"


def check_written_videos(cfg: TrainConfig) -> None:
    """Videos the run writes as H.264 (yuv420p: even heights and widths): a text-to-video
    run's samples of trainer.sample_prompts, an autoencoder run's reconstructions at each
    validation; and an autoencoder run's validation SSIM needs frames of its window."""
    if cfg.task is Task.tae:
        held_out = (getattr(cfg.data, "val_shards", None) is not None
                    or getattr(cfg.data, "val_samples", 0) > 0)
        if not held_out:
            return
        what = "validation writes inputs and reconstructions as H.264 videos"
    elif cfg.trainer.sample_prompts:
        what = "trainer.sample_prompts are sampled and written as H.264 videos"
    else:
        return
    for _, height, width in sample_shapes(cfg.data):
        # reconstructions sit beside their inputs: twice the width, always even
        odd_width = width % 2 and cfg.task is not Task.tae
        if height % 2 or odd_width:
            raise ConfigError(f"{_size_key(cfg, height, width)}: {what}, which need an even "
                              f"height and width; use even sizes")
        if cfg.task is Task.tae and min(height, width) < SSIM_TAPS:
            raise ConfigError(f"{_size_key(cfg, height, width)}: validation measures SSIM "
                              f"with an {SSIM_TAPS}-pixel window, which needs frames of at "
                              f"least {SSIM_TAPS}x{SSIM_TAPS}; use larger sizes")


def check_heads_fit(heads: int, tp: int, cp: int, cp_mode: CPMode) -> None:
    """Tensor parallelism splits whole heads; Ulysses splits each rank's heads over cp."""
    try:
        check_heads(heads, tp)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cp_mode is CPMode.ulysses and cp > 1 and heads % (tp * cp):
        raise ConfigError(f"parallel.cp_mode=ulysses needs model.heads={heads} divisible by "
                          f"parallel.tp × parallel.cp = {tp} × {cp}; change cp/tp "
                          f"or use parallel.cp_mode=allgather_kv or ring")


def check_parallel_fits(cfg: TrainConfig, world_size: int) -> MeshDims:
    """Mesh sizes against the process count, the heads and the batch; the resolved dims."""
    par = cfg.parallel
    try:
        dims = MeshDims(par.dp_replicate, par.dp_shard, par.cp, par.tp).resolved(world_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_heads_fit(cfg.model.heads, dims.tp, dims.cp, par.cp_mode)
    if cfg.recipe.batch_size % dims.dp:
        raise ConfigError(f"recipe.batch_size={cfg.recipe.batch_size} (the global batch) is "
                          f"not divisible by the {dims.dp} data-parallel replicas "
                          f"(parallel.dp_replicate × dp_shard = {dims.dp_replicate} × "
                          f"{dims.dp_shard})")
    return dims


def sample_shapes(data: Any) -> list[tuple[int, int, int]]:
    """Every (frames, height, width) a batch of this data config can have."""
    if isinstance(data, WebDatasetConfig):
        return [(b.frames, b.height, b.width) for b in data.grid().shapes()]
    return [(data.frames, data.height, data.width)]


def check_latent_fits(cfg: TrainConfig, autoencoder: Any) -> tuple[int, int, int, int]:
    """Every shape the data can produce must pass the autoencoder and fit the DiT's patches
    and tables.

    Returns the latent shape (C, T, H, W) with the most tokens (the one sampled).
    """
    latents = []
    for frames, height, width in sample_shapes(cfg.data):
        where = f"data frames/height/width={frames}/{height}/{width}"
        try:
            latent = autoencoder.latent_shape(frames, height, width)
        except ValueError as error:
            raise ConfigError(f"{where} do not fit the autoencoder: {error}") from error
        try:
            patch_grid(cfg.model, latent)
        except ValueError as error:
            raise ConfigError(f"{error} (latent {tuple(latent)} from {where} through the "
                              f"autoencoder)") from error
        latents.append(tuple(latent))
    return max(latents, key=lambda latent: latent[1] * latent[2] * latent[3])


def manifest_of(cfg: TrainConfig) -> dict[str, Any]:
    """``cache_manifest`` of a run's config: what decides the values a cache holds."""
    return cache_manifest(cfg.data, cfg.autoencoder, cfg.text, cfg.trainer.seed,
                          is_preference(cfg.data))


def check_text_frozen(cfg: TrainConfig) -> None:
    """Cached encodings need encoders that never change."""
    try:
        check_frozen_text(cfg.text.encoders)
    except CacheMismatch as error:
        raise ConfigError(str(error)) from None


def check_cache_matches(cfg: TrainConfig, data: LatentDataConfig) -> None:
    """Training from a cache: the run's config must be the one that wrote it."""
    check_text_frozen(cfg)
    try:
        check_cache(data, manifest_of(cfg))
    except CacheMismatch as error:
        raise ConfigError(str(error)) from None
