"""Build the run's components from the validated config: model on meta, then materialise.

The parallel layer works between the two: modules are sharded while they are still on the
meta device, then each rank allocates and fills only its shards.
"""

from __future__ import annotations

import math

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors.torch import load_file

from models.dit import DiT
from models.flow import FlowMatching
from models.pretrained_text import EncoderSettingError
from models.t2v import TextToVideo
from models.text import TextConditioner
from parallel.engine import NativeEngine, TrainingEngine
from parallel.mesh import MeshDims, ParallelContext
from parallel.parallelize import materialise, parallelize_model
from trainer.config import ConfigError, Engine, TrainConfig
from trainer.optim import build_optimizer
from trainer.precision import param_dtype


def single_process(device: torch.device) -> ParallelContext:
    return ParallelContext(MeshDims(dp_shard=1), 0, 1, device)


def build_autoencoder(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The frozen autoencoder between pixels and the DiT's latents; a trainable one (the
    TAE) loads its trained weights from ``autoencoder.checkpoint``."""
    try:
        autoencoder = instantiate(cfg.autoencoder)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):  # its messages name autoencoder.<key>
            raise ConfigError(str(error.__cause__)) from error.__cause__
        raise
    if autoencoder.trainable:
        load_autoencoder_weights(autoencoder, cfg.autoencoder.checkpoint)
    autoencoder.requires_grad_(False)
    return autoencoder.to(device).eval()


def load_autoencoder_weights(autoencoder: torch.nn.Module, checkpoint: str) -> None:
    """Weights from a safetensors file written by ``python -m trainer.export`` of a
    ``task=tae`` run (its ``autoencoder.*`` tensors; the discriminator's are not needed),
    or of the autoencoder alone. The config check made sure the file exists."""
    tensors = load_file(checkpoint)
    prefix = "autoencoder."
    if any(name.startswith(prefix) for name in tensors):
        tensors = {name[len(prefix):]: value for name, value in tensors.items()
                   if name.startswith(prefix)}
    try:
        autoencoder.load_state_dict(tensors)
    except RuntimeError as error:
        raise ConfigError(f"autoencoder.checkpoint={checkpoint} does not fit the configured "
                          f"autoencoder (check its channels and compressions against the run "
                          f"that trained it): {str(error).splitlines()[0]} ...") from error


def build_modules(cfg: TrainConfig) -> TextToVideo:
    """Text conditioner + DiT, on the current default device. Pretrained encoders read only
    their config and tokenizer here; ``materialise`` loads weights."""
    encoders = {name: _build_encoder(name, node) for name, node in cfg.text.encoders.items()}
    return TextToVideo(DiT(cfg.model), TextConditioner(encoders, cfg.model.width))


def build_meta_model(cfg: TrainConfig) -> TextToVideo:
    """The model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return build_modules(cfg)


def _build_encoder(name: str, node) -> torch.nn.Module:
    try:
        return instantiate(node)
    except InstantiationException as error:
        # Only here is the encoder's name known: name the full key of the bad setting.
        if isinstance(error.__cause__, EncoderSettingError):
            raise ConfigError(f"text.encoders.{name}.{error.__cause__}") from error.__cause__
        raise


def build_model(cfg: TrainConfig, ctx: ParallelContext) -> TextToVideo:
    """Text conditioner + DiT: built on meta, parallelised for ``ctx``, then materialised
    with the initial values of ``cfg.trainer.seed``. Under DeepSpeed ZeRO-3 the modules are
    built under ``zero.Init`` (each rank holds its partition of every parameter); under
    ZeRO-1/2 the model is returned whole and the engine partitions the optimizer."""
    par = cfg.parallel
    dtype = param_dtype(cfg, ctx.device)
    # a ZeRO-3 run's training ranks; a single process reading its checkpoint (export,
    # sample) builds the whole model
    zero3 = par.engine is Engine.deepspeed and par.zero_stage == 3 and ctx.distributed
    model = build_zero3_modules(cfg, ctx, dtype) if zero3 else build_meta_model(cfg)
    parallel_ctx = ctx if par.engine is Engine.fsdp2 else single_process(ctx.device)
    parallelize_model(model, parallel_ctx, cp_mode=par.cp_mode.value,
                      activation_checkpointing=par.activation_checkpointing.value,
                      checkpoint_every=par.checkpoint_every, compile=par.compile,
                      param_dtype=dtype)
    if not zero3:
        materialise(model, ctx.device, cfg.trainer.seed)
    return model


def build_zero3_modules(cfg: TrainConfig, ctx: ParallelContext, dtype: torch.dtype
                        ) -> TextToVideo:
    """The modules built under ``zero.Init``, each rank's partitions already filled."""
    from parallel.deepspeed_engine import build_partitioned, ds_config

    par = cfg.parallel
    # zero.Init reads the partitioning, offload and bf16 settings; clipping is the engine's
    config = ds_config(cfg.recipe.batch_size, ctx.dp_size, math.inf, par.zero_stage,
                       par.offload_optimizer, par.offload_params, dtype is torch.bfloat16)
    return build_partitioned(lambda: build_modules(cfg), config, ctx.device,
                             cfg.trainer.seed)[0]


def build_flow(cfg: TrainConfig) -> FlowMatching:
    recipe = cfg.recipe
    return FlowMatching(recipe.sigma_min, recipe.t_mean, recipe.t_std, recipe.noise_offset)


def build_engine(cfg: TrainConfig, model: torch.nn.Module, ctx: ParallelContext
                 ) -> TrainingEngine:
    """The engine ``parallel.engine`` names, around the built ``model``."""
    par = cfg.parallel

    def make_optimizer(params):
        # fused: the native engine skips a non-finite step on the device through it
        return build_optimizer(params, cfg.recipe, cfg.trainer.max_steps,
                               fused=par.engine is Engine.fsdp2)

    if par.engine is Engine.fsdp2:
        return NativeEngine(model, make_optimizer)
    from parallel.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, make_optimizer, ctx, batch_size=cfg.recipe.batch_size,
                           grad_clip=cfg.recipe.grad_clip, zero_stage=par.zero_stage,
                           offload_optimizer=par.offload_optimizer,
                           offload_params=par.offload_params,
                           bf16=param_dtype(cfg, ctx.device) is torch.bfloat16)
