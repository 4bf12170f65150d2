"""Apply parallelism and memory/speed switches to a model built on meta, from outside.

The torchtitan pattern: model files define the math, this file decides how it runs.
Order: tensor/sequence parallel (DTensor plans) -> context parallel (token sharding hooks
and the attention seam) -> activation checkpointing -> per-block compile -> FSDP2. Then
``materialise`` allocates each rank's shards and fills them parameter by parameter with
exactly the single-process initial values.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.tensor import DTensor, Replicate

from models.dit import DiT
from models.init import DrawTally, initial_value
from models.t2v import TextToVideo
from models.tae_training import AutoencoderTraining
from parallel.context_parallel import SequenceShards, context_parallel_attention
from parallel.fsdp import apply_fsdp, apply_fsdp_autoencoder, needs_fsdp
from parallel.mesh import ParallelContext
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.weights import shard_index


def apply_activation_checkpointing(dit: DiT, mode: str, every: int = 1) -> None:
    """Recompute checkpointed blocks' activations in backward. mode: none | full | every_k.

    The composable ``checkpoint`` keeps parameter names, so checkpoints, EMA and optimizer
    state are the same with the switch on or off.
    """
    if mode == "none":
        return
    stride = 1 if mode == "full" else every
    for index, block in enumerate(dit.blocks):
        if index % stride == 0:
            checkpoint(block)


def checkpoint_modules(modules: list[nn.Module]) -> None:
    """Recompute each module's activations in backward, keeping only its input (the frozen
    decoder's blocks under the pixel-space loss). The modules have no randomness, so the
    RNG state is not stashed."""
    for module in modules:
        checkpoint(module, preserve_rng_state=False)


def compile_blocks(dit: DiT) -> None:
    """Compile every block separately: one graph per block type, shared by all of them."""
    for block in dit.blocks:
        block.compile()


def _shard_local(shards: SequenceShards, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``shards.shard`` on a plain tensor or on the local value of a Replicate DTensor."""
    if isinstance(x, DTensor):
        local = shards.shard(x.to_local(), dim)
        return DTensor.from_local(local, x.device_mesh, [Replicate()], run_check=False)
    return shards.shard(x, dim)


def apply_context_parallel(dit: DiT, ctx: ParallelContext, mode: str) -> SequenceShards:
    """Each cp rank runs the blocks on its contiguous slice of the tokens; -> that split
    (its ``row_sums`` let a block cache decide on whole rows).

    The patch tokens, the position table and the rotary tables are sliced (padded to a
    multiple of cp; the padding is masked inside attention), self-attention goes through
    the chosen CP kernel, and the final layer's output is gathered, so the loss sees every
    token on every rank.
    """
    shards = SequenceShards(ctx.group("cp"))
    attention = context_parallel_attention(mode, shards)
    for block in dit.blocks:
        block.attn.attention_fn = attention
    # prepend: slice before the tensor-parallel hooks turn the tensors into DTensors
    dit.patch_embed.register_forward_pre_hook(
        lambda _, args: (_shard_local(shards, args[0], 1),), prepend=True)
    dit.pos_embed.register_forward_hook(
        lambda _, args, out: _shard_local(shards, out, 0), prepend=True)
    if dit.rope is not None:  # the rotary tables (cos, sin) follow the tokens
        dit.rope.register_forward_hook(
            lambda _, args, out: tuple(shards.shard(table, 0) for table in out))
    dit.final.register_forward_hook(lambda _, args, out: shards.gather(out, 1))
    return shards


def apply_model_parallel(dit: DiT, ctx: ParallelContext,
                         cp_mode: str) -> SequenceShards | None:
    """Tensor/sequence parallel, then context parallel: the plan training and sampling
    share (sampling stops here: with no gradients or optimizer state to shard, FSDP
    would only add a parameter all-gather to every step). -> the cp split, if any."""
    if ctx.dims.tp > 1:
        apply_tensor_parallel(dit, ctx.submesh("tp"))
    return apply_context_parallel(dit, ctx, cp_mode) if ctx.dims.cp > 1 else None


def parallelize_model(model: TextToVideo, ctx: ParallelContext, *, cp_mode: str,
                      activation_checkpointing: str, checkpoint_every: int, compile: bool,
                      param_dtype: torch.dtype) -> None:
    """Apply every configured parallelism to the meta model in place."""
    dit = model.dit
    apply_model_parallel(dit, ctx, cp_mode)
    apply_activation_checkpointing(dit, activation_checkpointing, checkpoint_every)
    if compile:
        compile_blocks(dit)
    if needs_fsdp(ctx):
        apply_fsdp(model, ctx, param_dtype)


def parallelize_autoencoder(model: AutoencoderTraining, ctx: ParallelContext,
                            param_dtype: torch.dtype) -> None:
    """The TAE trains data-parallel only (FSDP2 over dp_shard, HSDP with dp_replicate);
    the config check refuses tp and cp for it."""
    if needs_fsdp(ctx):
        apply_fsdp_autoencoder(model, ctx, param_dtype)


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device, seed: int) -> int:
    """Allocate this rank's shards on ``device`` and fill them with the single-process
    initial values, drawing only this rank's block of each parameter (never a whole
    sharded parameter, never the whole model). Returns the elements this rank drew from
    the init generators."""
    model.to_empty(device=device)
    tally = DrawTally()
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        value = initial_value(model, name, param.shape, seed, shard_index(param), tally)
        local.copy_(value.to(device, param.dtype))
    return tally.elements
