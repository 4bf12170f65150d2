"""Tensor + sequence parallelism for the DiT with DTensor plans (arXiv 2410.13720 §6, Megatron-SP).

Inside a block the residual stream is sharded along the sequence over the tp group
(``Shard(1)``): norms, adaLN modulation and residual adds run on 1/tp of the tokens.
Before each of the three sublayers the stream is all-gathered (``Replicate``) and the
projections are split Megatron-style: q/k/v and SwiGLU w1/w3 column-wise (a rank owns
heads/tp heads and ffn/tp hidden units), the output projections wo and w2 row-wise with a
reduce-scatter back to ``Shard(1)``. Per block and pass that is 3 all-gathers and 3
reduce-scatters of (B, L, D), the text context is replicated.

Every other parameter (position tables, time MLP, per-block modulation tables, norms,
final layer) becomes a ``Replicate`` DTensor, so its gradient, computed from a sequence
shard, is summed over the tp group by DTensor rather than by hand. The stream enters
sharded at ``patch_embed`` and leaves gathered at ``final``: outside the blocks every tp
rank holds the same plain tensors.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from models.dit import DiT


def check_heads(heads: int, tp: int) -> None:
    if heads % tp:
        raise ValueError(f"model.heads={heads} is not divisible by parallel.tp={tp}: tensor "
                         f"parallelism splits whole heads; pick tp dividing {heads}")


def _gathered_input(*tail) -> PrepareModuleInput:
    """The sublayer input: sequence-sharded stream -> replicated (one all-gather)."""
    return PrepareModuleInput(input_layouts=(Shard(1), *tail),
                              desired_input_layouts=(Replicate(), *tail))


def _row_to_sequence_shards() -> RowwiseParallel:
    """Output projection: partial sums reduce-scattered straight into sequence shards."""
    return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)


def block_plan() -> dict:
    return {
        "attn": _gathered_input(),
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.wo": _row_to_sequence_shards(),
        "cross_attn": _gathered_input(Replicate(), None),
        "cross_attn.wq": ColwiseParallel(),
        "cross_attn.wk": ColwiseParallel(),
        "cross_attn.wv": ColwiseParallel(),
        "cross_attn.wo": _row_to_sequence_shards(),
        "ffn": _gathered_input(),
        "ffn.w1": ColwiseParallel(),
        "ffn.w3": ColwiseParallel(),
        "ffn.w2": _row_to_sequence_shards(),
    }


def replicate_remaining_params(module: nn.Module, mesh: DeviceMesh) -> None:
    """Turn every parameter that is not yet a DTensor into a Replicate DTensor (works on
    meta: no data moves)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param is None or isinstance(param, DTensor):
                continue
            replicated = DTensor.from_local(param.data, mesh, [Replicate()], run_check=False)
            sub.register_parameter(name, nn.Parameter(replicated, param.requires_grad))


def apply_tensor_parallel(dit: DiT, tp_mesh: DeviceMesh) -> None:
    """Shard ``dit`` in place over ``tp_mesh`` (1-D). Call on the meta model, before FSDP."""
    check_heads(dit.cfg.heads, tp_mesh.size())
    for block in dit.blocks:
        parallelize_module(block, tp_mesh, block_plan())
    parallelize_module(dit, tp_mesh, {
        # Plain patch tokens, identical on every tp rank, enter as sequence shards.
        "patch_embed": PrepareModuleInput(input_layouts=(Replicate(),),
                                          desired_input_layouts=(Shard(1),)),
        # Positions (L, D) are added to the (B, L, D) stream: shard them the same way so the
        # gradient reaches the tables gathered.
        "pos_embed": PrepareModuleOutput(output_layouts=(Replicate(),),
                                         desired_output_layouts=(Shard(0),),
                                         use_local_output=False),
        "time_embed.fc1": PrepareModuleInput(input_layouts=(Replicate(),),
                                             desired_input_layouts=(Replicate(),)),
        **({} if dit.text_embed is None else {
            "text_embed.fc1": PrepareModuleInput(input_layouts=(Replicate(),),
                                                 desired_input_layouts=(Replicate(),))}),
        "final": PrepareModuleOutput(output_layouts=(Shard(1),),
                                     desired_output_layouts=(Replicate(),),
                                     use_local_output=True),
    })
    replicate_remaining_params(dit, tp_mesh)
