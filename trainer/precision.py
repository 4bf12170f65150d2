"""Mixed precision of the training step, resolved from the device.

``auto`` (the default of ``trainer.precision`` and ``parallel.param_dtype``; ``trainer.tf32``
null) means: on a CUDA GPU with bf16 (compute capability 8.0+), bf16 autocast, weights
gathered in bf16 for compute by FSDP2 (DeepSpeed: its bf16 section) with gradients reduced
and master weights kept in fp32, and TF32 matmuls; anywhere else fp32. ``parallel.
param_dtype=auto`` follows the resolved ``trainer.precision``, so ``trainer.precision=fp32``
alone turns a GPU run to full fp32. An explicit value wins; one that cannot work is a
ConfigError naming the key, the value and the fix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from trainer.config import ConfigError, Engine, Precision, TrainConfig

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


@functools.cache
def has_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16: CUDA from compute capability 8.0 (read from the
    device's properties, no tensor is made); the CPU always (autocast emulates it where
    the instructions are missing, slowly)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def compute_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """``trainer.precision`` with ``auto`` resolved: bf16 on a CUDA device that has it."""
    setting = cfg.trainer.precision
    if setting is not Precision.auto:
        return setting
    return Precision.bf16 if device.type == "cuda" and has_bf16(device) else Precision.fp32


def param_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``parallel.param_dtype`` with ``auto`` resolved to the compute precision: the dtype
    FSDP2 gathers the (fp32-stored) weights in for forward and backward."""
    setting = cfg.parallel.param_dtype
    return DTYPES[compute_precision(cfg, device) if setting is Precision.auto else setting]


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when the resolved ``trainer.precision`` is bf16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=compute_precision(cfg, device) is Precision.bf16)


@dataclass(frozen=True)
class ResolvedPrecision:
    """What a training run computes in. ``param_dtype``: the sharding engine's compute
    copy of the weights (None: no sharding engine, the weights compute as stored, fp32);
    gradient reductions and master weights are always fp32."""

    autocast: Precision
    param_dtype: torch.dtype | None
    tf32: bool

    def describe(self) -> str:
        params = ("fp32 weights" if self.param_dtype is None else
                  f"weights gathered in {str(self.param_dtype).removeprefix('torch.')}")
        compute = "bf16 autocast" if self.autocast is Precision.bf16 else "fp32 (no autocast)"
        return (f"precision: {compute}, {params}, fp32 reduction and master weights, TF32 "
                f"matmuls {'on' if self.tf32 else 'off'}")


def resolve_precision(cfg: TrainConfig, device: torch.device, sharded: bool
                      ) -> ResolvedPrecision:
    """The run's precision on ``device``; ``sharded``: FSDP2 or DeepSpeed holds the weights
    (with FSDP off, parallel.param_dtype has nothing to act on). Raises ConfigError for a
    combination that cannot work."""
    trainer, par = cfg.trainer, cfg.parallel
    bf16_keys = [f"{key}=bf16" for key, value in (("trainer.precision", trainer.precision),
                                                   ("parallel.param_dtype", par.param_dtype))
                 if value is Precision.bf16]
    if bf16_keys and not has_bf16(device):
        raise ConfigError(f"{' and '.join(bf16_keys)}: bf16 needs a GPU of compute capability "
                          f"8.0+ (e.g. A100, H100), and this {device.type} device is older; "
                          f"set auto (fp32 here) or fp32")
    if par.param_dtype is Precision.bf16 and not sharded:
        raise ConfigError("parallel.param_dtype=bf16 sets the dtype FSDP2 gathers weights in, "
                          "but FSDP is off here (one data-parallel rank, dp_replicate x "
                          "dp_shard x cp = 1): set parallel.param_dtype=auto, or "
                          "trainer.precision=bf16 for bf16 compute")
    precision = compute_precision(cfg, device)
    dtype = param_dtype(cfg, device) if sharded else None
    if (par.engine is Engine.deepspeed and dtype is torch.bfloat16
            and precision is not Precision.bf16):
        raise ConfigError("parallel.param_dtype=bf16 with parallel.engine=deepspeed stores the "
                          "weights in bf16 (DeepSpeed's bf16 section), which needs bf16 "
                          "autocast: set trainer.precision=bf16, or parallel.param_dtype=fp32")
    if trainer.tf32 and device.type != "cuda":
        raise ConfigError(f"trainer.tf32=true allows TF32 in CUDA matmuls and convolutions, "
                          f"but trainer.device={trainer.device}: set trainer.tf32=null "
                          f"(auto) or false")
    tf32 = device.type == "cuda" if trainer.tf32 is None else trainer.tf32
    return ResolvedPrecision(precision, dtype, tf32)


def apply_tf32(resolved: ResolvedPrecision, device: torch.device) -> None:
    """Allow (or forbid) TF32 in this process's CUDA matmuls and cuDNN convolutions; the CPU's
    settings are left alone."""
    if device.type != "cuda":
        return
    # the legacy setters keep every backend's setting consistent, which
    # torch.get_float32_matmul_precision (read by inductor's autotuning) requires
    torch.set_float32_matmul_precision("high" if resolved.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = resolved.tf32
