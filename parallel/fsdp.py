"""FSDP2 over the dp_shard × cp ranks (HSDP when dp_replicate > 1), per-block units.

Parameters are replicated over cp (every cp rank runs the whole model on a slice of the
tokens), so the shard group is dp_shard × cp and each rank's gradient is a partial sum
over its tokens. The reduction therefore sums over cp and averages over data-parallel
replicas only: divide by dp = dp_replicate × dp_shard, not by the group size. Sums are
forced (gloo has no PREMUL_SUM) and the division happens after the reduction.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from models.t2v import TextToVideo
from models.tae_training import AutoencoderTraining
from parallel.mesh import ParallelContext


def needs_fsdp(ctx: ParallelContext) -> bool:
    dims = ctx.dims
    return dims.dp_replicate * dims.dp_shard * dims.cp > 1


def apply_fsdp(model: TextToVideo, ctx: ParallelContext, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """Units: every DiT block, each sharded frozen text encoder, the rest of the DiT
    (embeddings, final layer), the rest of the text conditioner, and the (parameter-free)
    root. A frozen encoder with ``shard=False`` (the small ones, arXiv 2410.13720 §6) stays out of
    FSDP: whole on every rank, never gathered. Sampling calls ``model.text`` and
    ``model.dit`` separately, so each must gather its own parameters. Call on the meta
    model after TP and CP."""
    mesh = ctx.submesh("hsdp" if ctx.dims.dp_replicate > 1 else "dp_shard_cp")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.dit.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    replicated: set[torch.nn.Parameter] = set()
    for encoder in model.text.encoders.values():
        frozen = not any(p.requires_grad for p in encoder.parameters())
        if not frozen:
            continue  # trainable: in the conditioner's unit, so its gradients are reduced
        if not getattr(encoder, "shard", True):
            replicated.update(encoder.parameters())
        else:
            # A frozen encoder in its own unit runs without grad, so backward never
            # gathers it again; sharing a unit with the trainable projections would.
            fully_shard(encoder, mesh=mesh, mp_policy=_frozen_policy(encoder, policy))
            register_fsdp_forward_method(encoder, "encode")  # the conditioner calls encode()
            encoder.set_unshard_in_backward(False)  # and FSDP2's backward prefetch skips it
    fully_shard(model.dit, mesh=mesh, mp_policy=policy)
    for unit in (model.text, model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=replicated or None)
    reduce_as_data_parallel(model, ctx)


def reduce_as_data_parallel(model: torch.nn.Module, ctx: ParallelContext) -> None:
    """Every unit sums gradients over its shard group and divides by the data-parallel
    size (the module docstring says why)."""
    # With one rank per shard group (pure replication) torch 2.13 divides by an explicit
    # factor twice (in its single-rank copy and again after the all-reduce); its default
    # factor there is the replica count, which is dp.
    shard_group_size = ctx.dims.dp_shard * ctx.dims.cp
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            if shard_group_size > 1:
                module.set_gradient_divide_factor(float(ctx.dims.dp))


def _frozen_policy(encoder: torch.nn.Module, policy: MixedPrecisionPolicy
                   ) -> MixedPrecisionPolicy:
    """An encoder stored in a low precision of its own (``dtype: bf16``) computes in it;
    an fp32 one follows the run's compute dtype."""
    stored = next(encoder.parameters()).dtype
    if stored == torch.float32:
        return policy
    return MixedPrecisionPolicy(param_dtype=stored, reduce_dtype=policy.reduce_dtype)


def apply_fsdp_autoencoder(model: AutoencoderTraining, ctx: ParallelContext,
                           param_dtype: torch.dtype,
                           reduce_dtype: torch.dtype = torch.float32) -> None:
    """Units: every encoder and decoder level and mid block, the rest of the encoder and of
    the decoder, the discriminator, and the root (latent heads and anything left)."""
    mesh = ctx.submesh("hsdp" if ctx.dims.dp_replicate > 1 else "dp_shard_cp")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    autoencoder = model.autoencoder
    for part in (autoencoder.encoder, autoencoder.decoder):
        for unit in (*part.levels, part.mid, part):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
    if model.discriminator is not None:
        fully_shard(model.discriminator, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    reduce_as_data_parallel(model, ctx)
