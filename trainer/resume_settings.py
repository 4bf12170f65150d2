"""Resuming with changed settings: what a restart may change, and what it may not.

Every checkpoint stores the config that trained it (``trainer.run_config``). A run that
resumes compares that config with its own before any weight is read. Settings that only
steer the rest of the run (the LR and its schedule, the step budget, logging, validation,
sampling, checkpoint cadence, the mesh, which native checkpoints reshard to) are applied
and listed; everything else decides what the weights are or which samples they see next
(the architecture, the autoencoder and text encoders, the data and its order, the seed,
the loss) and is refused with both values unless ``trainer.force=true``. A key the
checkpoint's config lacks (added to the schema since) is listed, not refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from trainer.config import ConfigError, TrainConfig
from trainer.run_config import (
    CONFIG_KEY,
    OVERRIDES_KEY,
    checkpoint_config,
    write_checkpoint_config,
)

log = logging.getLogger(__name__)

MAY_CHANGE = (
    "run_name",
    "trainer.max_steps", "trainer.device", "trainer.precision", "trainer.log_every",
    "trainer.val_every", "trainer.val_batches", "trainer.sample_every",
    "trainer.sample_steps", "trainer.guidance_scale", "trainer.sample_prompts",
    "trainer.judge_steps", "trainer.ckpt_every", "trainer.keep_last",
    "trainer.max_nonfinite_steps", "trainer.progress", "trainer.wandb.*",
    "trainer.init_*",  # only a fresh run starts from init_from
    "trainer.force", "trainer.async_checkpoint", "trainer.tf32",
    # the optimizer's hyperparameters and the schedule: ``trainer.optim.Scheduler`` applies
    # this run's values to the restored optimizer
    "recipe.lr", "recipe.betas", "recipe.weight_decay", "recipe.eps", "recipe.schedule",
    "recipe.warmup_steps", "recipe.min_lr_ratio", "recipe.grad_clip", "recipe.ema_decay",
    "recipe.plateau.*", "recipe.early_stop.*", "recipe.val_metric", "recipe.step_cap",
    # native checkpoints reshard to any mesh (DeepSpeed ones refuse another dp size)
    "parallel.dp_replicate", "parallel.dp_shard", "parallel.cp", "parallel.tp",
    "parallel.cp_mode", "parallel.param_dtype", "parallel.activation_checkpointing",
    "parallel.checkpoint_every", "parallel.compile", "parallel.timeout_minutes",
    "text.encoders.*.shard", "recipe.pixel_loss.checkpointing",
    # held-out data; per-bucket batch sizes (a batch ramp keeps the shard positions)
    "data.val_shards", "data.val_samples", "data.judge_prompts", "data.prefetch_factor",
    "data.batch_sizes", "data.image_batch_size", "data.pipe_stall_s",
)


class _Absent:
    """A key one of the two configs does not have."""

    def __repr__(self) -> str:
        return "unset"


ABSENT = _Absent()


def plain_config(cfg: TrainConfig) -> dict[str, Any]:
    """The validated config as plain values (enums as their names)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def launch_metadata(cfg: TrainConfig) -> dict[str, str]:
    """This launch's config as a checkpoint stores it: the command-line overrides (none
    when ``train`` is called without Hydra's main) and every value. The overrides come
    from Hydra in memory: every rank rewrites ``.hydra/overrides.yaml`` as it starts."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {OVERRIDES_KEY: json.dumps(overrides),
            CONFIG_KEY: OmegaConf.to_yaml(plain_config(cfg))}


def with_run_config(write: Callable[[Path], Any], metadata: dict[str, str],
                    is_main: bool) -> Callable[[Path], Any]:
    """The checkpoint writer ``write`` that also stores the run's config (rank 0)."""
    def writer(directory: Path) -> Any:
        if is_main:
            write_checkpoint_config(directory, metadata)
        return write(directory)

    return writer


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists are leaves (compared whole)."""
    if not isinstance(node, dict) or not node:
        return {prefix[:-1]: node} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= flatten(value, f"{prefix}{key}.")
    return out


def changed_settings(stored: dict[str, Any], current: dict[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
    """{key: (the checkpoint's value, this run's)} for every key whose value differs."""
    before, now = flatten(stored), flatten(current)
    return {key: (before.get(key, ABSENT), now.get(key, ABSENT))
            for key in sorted(before.keys() | now.keys())
            if before.get(key, ABSENT) != now.get(key, ABSENT)}


def may_change(key: str, cfg: TrainConfig) -> bool:
    """MAY_CHANGE, plus the keys the run's data option lists as ``resumable`` (synthetic
    clips come in the sampler's order whatever builds them; webdataset shards are dealt to
    the loader workers, so there their count is part of the data position)."""
    data_keys = {f"data.{name}" for name in getattr(type(cfg.data), "resumable", ())}
    return key in data_keys or any(fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def check_resume(cfg: TrainConfig, checkpoint: Path | None) -> list[str]:
    """Compare the config stored with ``checkpoint`` (None: a fresh run) with ``cfg``:
    raise ConfigError for settings that cannot change; the changes as lines to log."""
    if checkpoint is None:
        return []
    stored = checkpoint_config(checkpoint)
    if stored is None:
        log.warning("%s stores no config (written by an older version): changed settings "
                    "cannot be checked against it", checkpoint)
        return []
    changes = changed_settings(OmegaConf.to_container(OmegaConf.create(stored[CONFIG_KEY])),
                               plain_config(cfg))
    fixed = {key: values for key, values in changes.items()
             if not may_change(key, cfg) and values[0] is not ABSENT}
    if fixed and not cfg.trainer.force:
        named = "; ".join(f"{key}={now!r} (the checkpoint: {key}={before!r})"
                          for key, (before, now) in fixed.items())
        raise ConfigError(f"resuming from {checkpoint} with settings that cannot change "
                          f"within a run: {named}. Put them back, start a new run (another "
                          f"run_name, with trainer.init_from=<this run> to start from its "
                          f"weights), or pass trainer.force=true to resume anyway")
    return [f"{'forced ' if key in fixed else ''}{key}={now!r} (the checkpoint: {before!r})"
            for key, (before, now) in changes.items()]
