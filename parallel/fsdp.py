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
from parallel.mesh import ParallelContext


def needs_fsdp(ctx: ParallelContext) -> bool:
    dims = ctx.dims
    return dims.dp_replicate * dims.dp_shard * dims.cp > 1


def apply_fsdp(model: TextToVideo, ctx: ParallelContext, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """Units: every DiT block, each frozen text encoder, the rest of the DiT (embeddings,
    final layer), the rest of the text conditioner, and the (parameter-free) root.
    Sampling calls ``model.text`` and ``model.dit`` separately, so each must gather its
    own parameters. Call on the meta model after TP and CP."""
    mesh = ctx.submesh("hsdp" if ctx.dims.dp_replicate > 1 else "dp_shard_cp")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.dit.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    for encoder in model.text.encoders.values():
        # A frozen encoder in its own unit runs without grad, so backward never gathers it
        # again; sharing a unit with the trainable projections would.
        if not any(p.requires_grad for p in encoder.parameters()):
            fully_shard(encoder, mesh=mesh, mp_policy=policy)
            register_fsdp_forward_method(encoder, "encode")  # the conditioner calls encode()
            encoder.set_unshard_in_backward(False)  # and FSDP2's backward prefetch skips it
    for unit in (model.dit, model.text, model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(float(ctx.dims.dp))
