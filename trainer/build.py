"""Build the run's components from the validated config: model on meta, then materialise.

The parallel layer works between the two: modules are sharded while they are still on the
meta device, then each rank allocates and fills only its shards.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from models.dit import DiT
from models.flow import FlowMatching
from models.t2v import TextToVideo
from models.text import TextConditioner
from parallel.mesh import MeshDims, ParallelContext
from parallel.parallelize import materialise, parallelize_model
from trainer.config import Engine, Precision, TrainConfig

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


def single_process(device: torch.device) -> ParallelContext:
    return ParallelContext(MeshDims(dp_shard=1), 0, 1, device)


def build_autoencoder(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    autoencoder = instantiate(cfg.autoencoder).to(device)
    autoencoder.requires_grad_(False)
    return autoencoder.eval()


def build_meta_model(cfg: TrainConfig) -> TextToVideo:
    """Text conditioner + DiT on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        encoders = {name: instantiate(encoder) for name, encoder in cfg.text.encoders.items()}
        return TextToVideo(DiT(cfg.model), TextConditioner(encoders, cfg.model.width))


def build_model(cfg: TrainConfig, ctx: ParallelContext) -> TextToVideo:
    """Text conditioner + DiT: built on meta, parallelised for ``ctx``, then materialised
    with the initial values of ``cfg.trainer.seed``. Under DeepSpeed the model is returned
    whole; its engine partitions it."""
    model = build_meta_model(cfg)
    par = cfg.parallel
    parallel_ctx = ctx if par.engine is Engine.fsdp2 else single_process(ctx.device)
    parallelize_model(model, parallel_ctx, cp_mode=par.cp_mode.value,
                      activation_checkpointing=par.activation_checkpointing.value,
                      checkpoint_every=par.checkpoint_every, compile=par.compile,
                      param_dtype=DTYPES[par.param_dtype])
    materialise(model, ctx.device, cfg.trainer.seed)
    return model


def build_flow(cfg: TrainConfig) -> FlowMatching:
    recipe = cfg.recipe
    return FlowMatching(recipe.sigma_min, recipe.t_mean, recipe.t_std)
