"""Per-GPU memory of a DiT training step on a mesh, in closed form from the model code.

State (``state_bytes``): the repo keeps every parameter in fp32 (``parallel.param_dtype``
only sets the dtype FSDP2 gathers for compute, so the fp32 shard is the master copy);
gradients are fp32 (FSDP2's reduce dtype), AdamW keeps fp32 m and v, the EMA one fp32
shadow, all of them this rank's TP-local, FSDP2-padded shard.

Communication buffers (``fsdp_buffer_bytes``): at the peak of a block's backward FSDP2
holds the rest-of-DiT unit and the block unsharded, the next block's prefetched all-gather
output, the block's unsharded gradients and their fp32 reduce-scatter input.

Activations (``activation_bytes``): what autograd saves in each block, tensor by tensor
(models/dit.py, models/attention.py, the composite RMSNorm and the CP kernels), and the
peak of backward: the last block's SwiGLU backward holds three (B, L, ffn/tp) gradients
where its saved product was, after the final layer's saved tensors are freed (ring
attention: its gradient sums and the chunks in flight). With recompute only each block's
input stays, and that one block's saved set is rebuilt during its backward. Element sizes
follow the eager kernels (tests/test_plan.py holds the peak to a live-tensor count); a
compiled block saves less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.dit import DiTConfig
from parallel.mesh import MeshDims
from parallel.plan_comm import (
    ParamShapes,
    fsdp_shard_elements,
    fsdp_unit,
    needs_fsdp,
    tp_local_params,
)

FP32 = 4


def local_trainable_elements(params: ParamShapes, dims: MeshDims) -> int:
    """Elements of the trainable parameters one rank holds: TP-local, then its FSDP2 shard
    (dim 0 padded to the dp_shard x cp group) when FSDP applies."""
    n = dims.dp_shard * dims.cp if needs_fsdp(dims) else 1
    return sum(fsdp_shard_elements(shape, n) if n > 1 else math.prod(shape)
               for shape, trainable in tp_local_params(params, dims.tp).values() if trainable)


def state_bytes(params: ParamShapes, dims: MeshDims) -> dict[str, int]:
    """fp32 params, grads, AdamW m + v and EMA shadow of this rank's shard."""
    local = local_trainable_elements(params, dims) * FP32
    return {"params": local, "grads": local, "optimizer": 2 * local, "ema": local}


def fsdp_buffer_bytes(params: ParamShapes, dims: MeshDims, compute: int) -> dict[str, int]:
    """FSDP2's gathered parameters and gradient buffers at the peak of a block's backward
    (empty without FSDP): the rest-of-DiT unit and the block unsharded, the previous block's
    prefetched all-gather output, the block's unsharded gradients and their fp32 copy that
    is reduce-scattered. The unsharded parameters live in storages FSDP2 resizes in place
    (a dispatch-level counter never sees them allocated); the rest are fresh tensors."""
    if not needs_fsdp(dims):
        return {}
    units: dict[str, int] = {}
    for name, (shape, _) in tp_local_params(params, dims.tp).items():
        unit = fsdp_unit(name, True)
        units[unit] = units.get(unit, 0) + math.prod(shape)
    block = max((e for unit, e in units.items() if ".blocks." in unit), default=0)
    return {"unsharded params": (units.get("dit", 0) + block) * compute,
            "prefetched block": block * compute, "unsharded grads": block * compute,
            "reduce-scatter input": block * FP32}


@dataclass(frozen=True)
class ActivationShape:
    """One rank's share of a step: ``batch`` samples of ``tokens`` video tokens and
    ``context`` text tokens, on a tp x cp slice, ``element`` bytes per activation."""

    batch: int
    tokens: int
    context: int
    tp: int = 1
    cp: int = 1
    cp_mode: str = "allgather_kv"
    element: int = 4

    @property
    def local(self) -> int:
        """Ls: tokens per cp rank, padding included."""
        return -(-self.tokens // self.cp)

    @property
    def stream(self) -> int:
        """Tokens of the sequence-sharded stream on a tp rank (DTensor pads to ceil)."""
        return -(-self.local // self.tp)


def _norm(s: ActivationShape, m: DiTConfig, weighted: bool) -> int:
    """RMSNorm on the sharded stream, as its composite saves it: the input upcast to fp32
    (the input itself when fp32), 1/rms in fp32 and the normed value, in the input dtype,
    or in fp32 when an affine weight multiplies it before the cast back."""
    stream = s.batch * s.stream * m.width
    return stream * FP32 + s.batch * s.stream * FP32 + stream * (FP32 if weighted else s.element)


def _self_attention_kernel(m: DiTConfig, s: ActivationShape) -> int:
    """Saved by the attention kernel, and wo's input when it is a copy, in bytes."""
    b, e, ls, tp = s.batch, s.element, s.local, s.tp
    head = b * ls * m.width // tp * e  # one (B, heads/tp, Ls, d) tensor
    lse = b * m.heads // tp * ls * FP32
    cp_mode = s.cp_mode if s.cp > 1 else "none"
    if cp_mode == "allgather_kv":  # local q and out; gathered K, V of the padded sequence
        kernel = 2 * head + 2 * head * s.cp + lse
    else:  # SDPA (no CP, or ulysses on its head shards of the padded sequence) and the
        # ring's fused kernels: q, k, v, out and the LSE
        kernel = 4 * head + lse
    # wo reads the output merged over heads: free when the kernel wrote it (B, L, h, d), a
    # copy after RoPE's contiguous q or a CP kernel's (B, h, L, d) output
    copy = head if m.rope or cp_mode in ("ulysses", "ring") else 0
    return kernel + copy


def sublayer_saved_bytes(m: DiTConfig, s: ActivationShape) -> dict[str, int]:
    """Bytes autograd saves in one DiT block (DiTBlock.forward) without recompute, per
    sublayer; "modulation" is the (B, 6, D) table and the two 1 + scale factors."""
    b, e, tp = s.batch, s.element, s.tp
    d, ls = m.width, s.local
    stream = b * s.stream * d * e  # a (B, L/tp, D) tensor of the sharded stream
    gathered = b * ls * d * e      # a sublayer input, all-gathered over tp
    lse = b * m.heads // tp * ls * FP32
    return {
        # + wo's output, kept by the gate multiply
        "self-attention": _norm(s, m, False) + gathered + _self_attention_kernel(m, s) + stream,
        "cross-attention": (_norm(s, m, True) + gathered + 2 * b * ls * d // tp * e  # q, out
                            + 2 * b * s.context * d // tp * e  # text K, V
                            + b * s.context * e + lse),        # float key mask, LSE
        # w1, SiLU, w3 and product hidden states; w2's output, kept by the gate multiply
        "ffn": _norm(s, m, False) + gathered + 4 * b * ls * m.ffn_dim // tp * e + stream,
        "modulation": 8 * b * d * e,
    }


def ring_backward_bytes(m: DiTConfig, s: ActivationShape) -> int:
    """What ring attention's backward adds to the saved activations: its fp32 dQ and dK, dV
    sums, the K/V in flight (the stacked chunk and the one arriving), the fused kernel's
    dQ, dK, dV of one step and the dK, dV partial sum in flight."""
    head = s.batch * s.local * m.width // s.tp
    return 3 * head * FP32 + (4 + 3 + 2) * head * s.element


def outside_saved_bytes(m: DiTConfig, s: ActivationShape) -> tuple[int, int]:
    """(saved outside the blocks, of which the final layer's): patch tokens, time MLP,
    text context, RoPE tables (fp32, shared by the blocks), final norm and projection
    input."""
    b, e, d = s.batch, s.element, m.width
    patches = b * s.tokens * m.patch_volume * m.in_channels * e
    time = b * (m.time_freq_dim + 4 * d) * e
    context = b * s.context * d * e
    rope = s.local * (d // m.heads) * FP32 if m.rope else 0
    final = _norm(s, m, False) + b * s.stream * d * e
    return patches + time + context + rope + final, final


def activation_bytes(m: DiTConfig, s: ActivationShape, recompute: bool) -> dict[str, int]:
    """{"saved": saved for backward at the end of the forward, "peak": the most alive
    during forward + backward (activations and their gradients, no parameters)}."""
    parts = sublayer_saved_bytes(m, s)
    block = sum(parts.values())
    outside, final = outside_saved_bytes(m, s)
    block_input = s.batch * s.stream * m.width * s.element  # what a checkpoint keeps
    saved = m.depth * (block_input if recompute else block) + outside
    # The last block's backward, after the final layer's saved tensors are freed: SwiGLU's
    # d(product), d(SiLU), d(w3 out) alive where the product was; ring attention's buffers
    # once the block's SwiGLU and cross-attention are done.
    swiglu = 2 * s.batch * s.local * m.ffn_dim // s.tp * s.element
    ring = (ring_backward_bytes(m, s) - parts["ffn"] - parts["cross-attention"]
            if s.cp > 1 and s.cp_mode == "ring" else 0)
    rebuilt = block - block_input if recompute else 0
    return {"saved": saved, "peak": saved + max(0, rebuilt + max(swiglu, ring) - final)}
