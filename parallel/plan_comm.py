"""Bytes one rank sends in one training step, term by term, from the parallel plans.

The closed forms behind ``bench/parallel_comm.py`` (measured there and in
tests/test_plan.py with ``parallel.comm_counter.CommCounter``, same definition of "sent")
and behind the planner (``parallel.plan``):
  - TP/SP (``tensor_parallel.block_plan``): per block and pass 3 all-gathers of the
    sequence-sharded stream and 3 reduce-scatters back, the final output gathered, the
    position-table gradient gathered, the text context's gradient all-reduced per block, two
    (B, D) time-path gradients all-reduced, and each Partial gradient of a replicated
    parameter all-reduced once;
  - CP: ``context_parallel.cp_attention_comm_bytes`` per self-attention call, and the final
    output gathered over cp;
  - FSDP2 (``parallel.fsdp`` units, dim 0 padded to the shard group): every trainable unit
    gathered twice (forward, backward), a frozen one once, the gradients reduce-scattered;
    with HSDP the reduced shards are then all-reduced over the replicas;
  - activation recompute runs each block's forward again in backward, with its TP and CP
    collectives (FSDP gathers the block for backward anyway);
  - the grad norm (``parallel.engine.total_grad_norm``): one 0-d fp32 all-reduce over the
    world when gradients are DTensors; the logged loss: one over dp.
Uneven shards are padded as the code pads them: CP to cp·ceil(L/cp), DTensor's sequence
shards to ceil(Ls/tp), FSDP2 dim 0 to a multiple of the shard group.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from fnmatch import fnmatch

from models.dit import DiTConfig
from parallel.context_parallel import cp_attention_comm_bytes
from parallel.mesh import MeshDims

CP_KINDS = {"allgather_kv": ("all_gather", "reduce_scatter"), "ulysses": ("all_to_all",) * 2,
            "ring": ("send", "send")}
# Replicated parameters whose gradient under TP/SP is a sum over this rank's tokens, so
# DTensor leaves it Partial: they meet the sequence-sharded stream (patch_embed, cross_norm,
# final.proj, the modulation tables through gates/shift/scale) or sit behind such a sum on
# the time path. DTensor reduces the time path's gradient at its two SiLUs, which leaves
# time_embed.fc1 Replicate; the position tables' gradient is all-gathered. Each Partial
# gradient is all-reduced once: by FSDP2 in backward, or without FSDP by
# ``NativeEngine.settle_partial_grads`` before the grad norm.
PARTIAL_GRADS = ("dit.patch_embed.weight", "dit.time_embed.fc2.weight",
                 "dit.time_modulation.weight", "dit.blocks.*.modulation",
                 "dit.blocks.*.cross_norm.weight", "dit.final.modulation",
                 "dit.final.proj.weight")

# name -> (shape, trainable), names as in TextToVideo ("dit.blocks.0.attn.wq.weight")
ParamShapes = dict[str, tuple[tuple[int, ...], bool]]


@dataclass(frozen=True)
class ElementSizes:
    """Bytes per element on the wire: ``compute`` for activations and FSDP's gathered
    parameters (``parallel.param_dtype``), ``reduce`` for gradient reductions (FSDP2's
    reduce_dtype, fp32)."""

    compute: int = 4
    reduce: int = 4


@dataclass(frozen=True)
class CommTerm:
    kind: str    # all_gather | reduce_scatter | all_reduce | all_to_all | send
    group: str   # tp | cp | fsdp (dp_shard x cp) | replicate | dp | world
    phase: str   # forward | backward | step (optimizer and logging)
    label: str
    nbytes: int  # sent by one rank
    # what the code runs it beside: "fsdp" (FSDP2's own all-gather / reduce-scatter
    # streams, prefetched), "attention" (ring attention's isend/irecv, posted before the
    # current block is computed) or "" (the next op waits for it)
    overlaps: str = ""


def needs_fsdp(dims: MeshDims) -> bool:
    """``parallel.fsdp.needs_fsdp`` on resolved mesh dims."""
    return dims.dp_replicate * dims.dp_shard * dims.cp > 1


def all_reduce(nbytes: int, n: int) -> int:
    """Sent by one rank in a ring all-reduce (reduce-scatter + all-gather)."""
    return 2 * nbytes * (n - 1) // n


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """A parameter's shape on one tp rank under ``tensor_parallel.block_plan``."""
    style = _tp_style(name)
    if style == "colwise":
        return (shape[0] // tp, *shape[1:])
    if style == "rowwise":
        return (shape[0], shape[1] // tp)
    return shape


@functools.cache
def _tp_style(name: str) -> str | None:
    """How ``block_plan`` splits parameter ``name``: colwise, rowwise or None (replicated)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from parallel.tensor_parallel import block_plan

    parts = name.split(".")
    style = block_plan().get(".".join(parts[3:-1])) if parts[1] == "blocks" else None
    if isinstance(style, ColwiseParallel):
        return "colwise"
    return "rowwise" if isinstance(style, RowwiseParallel) else None


@functools.cache
def is_partial_grad(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in PARTIAL_GRADS)


def fsdp_shard_elements(shape: tuple[int, ...], n: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 padded to n equal chunks."""
    return -(-shape[0] // n) * math.prod(shape[1:])


@functools.cache
def fsdp_unit(name: str, trainable: bool) -> str:
    """parallel.fsdp units: each DiT block, each frozen text encoder, the rest of the DiT,
    the rest of the text conditioner."""
    parts = name.split(".")
    if parts[1] == "blocks" or (parts[:2] == ["text", "encoders"] and not trainable):
        return ".".join(parts[:3])
    return parts[0]


def tp_local_params(params: ParamShapes, tp: int) -> ParamShapes:
    return {name: (tp_local_shape(name, shape, tp), trainable)
            for name, (shape, trainable) in params.items()}


def step_comm_terms(params: ParamShapes, model: DiTConfig, dims: MeshDims, cp_mode: str,
                    batch: int, tokens: int, context: int, sizes: ElementSizes = ElementSizes(),
                    recompute: bool = False) -> list[CommTerm]:
    """Every collective one rank issues in a train step on the resolved mesh ``dims``.

    ``params``: the whole model's parameters, unsharded; ``batch``: samples per
    data-parallel rank; ``tokens``: video tokens per sample; ``context``: text tokens.
    """
    tp, cp, a = dims.tp, dims.cp, sizes.compute
    local_params = tp_local_params(params, tp)
    width, depth = model.width, model.depth
    out_dim = model.patch_volume * model.in_channels
    local = -(-tokens // cp)  # CP shard, padding included
    seq = -(-local // tp)  # DTensor's Shard(1) chunk of it (uneven shards are padded)
    fsdp = needs_fsdp(dims)
    terms: list[CommTerm] = []

    def add(kind: str, group: str, phase: str, label: str, nbytes: int,
            overlaps: str = "") -> None:
        if nbytes:
            terms.append(CommTerm(kind, group, phase, label, nbytes, overlaps))

    if tp > 1:
        chunk = batch * seq * width * a * (tp - 1)  # one sublayer all-gather / reduce-scatter
        # FSDP2 reduces them on the unsharded gradients, still in the compute dtype; without
        # FSDP there is no mixed precision and they are fp32
        partial_element = a if fsdp else sizes.reduce
        partial = sum(all_reduce(math.prod(shape) * partial_element, tp)
                      for name, (shape, _) in local_params.items() if is_partial_grad(name))
        add("all_gather", "tp", "forward", "3 sublayer inputs/block", 3 * depth * chunk)
        add("reduce_scatter", "tp", "forward", "3 sublayer outputs/block", 3 * depth * chunk)
        add("all_gather", "tp", "forward", "final output", batch * seq * out_dim * a * (tp - 1))
        add("all_gather", "tp", "backward", "mirror of the reduce-scatters", 3 * depth * chunk)
        add("reduce_scatter", "tp", "backward", "mirror of the all-gathers", 3 * depth * chunk)
        if recompute:
            add("all_gather", "tp", "backward", "recompute: 3 inputs/block", 3 * depth * chunk)
            add("reduce_scatter", "tp", "backward", "recompute: 3 outputs/block",
                3 * depth * chunk)
        add("all_gather", "tp", "backward", "position grad", seq * width * a * (tp - 1))
        add("all_reduce", "tp", "backward", "text context grad/block",
            depth * all_reduce(batch * context * width * a, tp))
        add("all_reduce", "tp", "backward", "time-path SiLU grads",
            2 * all_reduce(batch * width * a, tp))
        # FSDP2 reduces the Partial gradients in backward, before its reduce-scatter;
        # without FSDP, NativeEngine.settle_partial_grads does at the optimizer step.
        add("all_reduce", "tp", "backward" if fsdp else "step",
            "Partial grads (FSDP2)" if fsdp else "settle Partial grads", partial,
            "fsdp" if fsdp else "")

    if cp > 1:
        per_layer = cp_attention_comm_bytes(cp_mode, batch, model.heads // tp, local * cp,
                                            width // model.heads, cp, a)
        forward_kind, backward_kind = CP_KINDS[cp_mode]
        ring = "attention" if cp_mode == "ring" else ""
        add(forward_kind, "cp", "forward", "self-attention", depth * per_layer["forward"], ring)
        add(backward_kind, "cp", "backward", "self-attention", depth * per_layer["backward"],
            ring)
        if recompute:
            add(forward_kind, "cp", "backward", "recompute: self-attention",
                depth * per_layer["forward"], ring)
        add("all_gather", "cp", "forward", "output gather", batch * local * out_dim * a * (cp - 1))

    if fsdp:
        n = dims.dp_shard * cp
        gathered, reduced = defaultdict(int), defaultdict(int)
        for name, (shape, trainable) in local_params.items():
            unit = fsdp_unit(name, trainable)
            gathered[unit] += fsdp_shard_elements(shape, n)
            reduced[unit] += fsdp_shard_elements(shape, n) if trainable else 0
        # Units without a trainable parameter: the frozen text encoders, in forward order.
        frozen = [unit for unit in gathered if not reduced[unit]]
        # reshard_after_forward: every trainable unit is gathered again for its backward; a
        # frozen encoder runs under no_grad and is marked not to unshard in backward, so
        # FSDP2's backward prefetch skips it too.
        trainable_units = sum(e for unit, e in gathered.items() if unit not in frozen)
        units = len(gathered) - len(frozen)
        add("all_gather", "fsdp", "forward", f"FSDP params ({units} units)",
            trainable_units * a * (n - 1), "fsdp")
        add("all_gather", "fsdp", "backward", f"FSDP params ({units} units)",
            trainable_units * a * (n - 1), "fsdp")
        add("all_gather", "fsdp", "forward", "frozen text encoder",
            sum(gathered[unit] for unit in frozen) * a * (n - 1), "fsdp")
        grads = sum(reduced.values()) * sizes.reduce
        add("reduce_scatter", "fsdp", "backward", "FSDP grads", grads * (n - 1), "fsdp")
        add("all_reduce", "replicate", "backward", "HSDP grads over replicas",
            all_reduce(grads, dims.dp_replicate), "fsdp")

    world = dims.dp_replicate * dims.dp_shard * cp * tp
    if fsdp or tp > 1:  # DTensor gradients: one summed square over all ranks
        add("all_reduce", "world", "step", "grad-norm square sum", all_reduce(4, world))
    add("all_reduce", "dp", "step", "loss mean over dp", all_reduce(4, dims.dp))
    return terms


def by_kind(terms: list[CommTerm]) -> dict[str, int]:
    """Bytes sent per collective kind (CommCounter's ``sent``)."""
    sent: dict[str, int] = defaultdict(int)
    for term in terms:
        sent[term.kind] += term.nbytes
    return dict(sent)
