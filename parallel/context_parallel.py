"""Context-parallel (CP) self-attention on rank-local tensors, over any process group.

One sample's sequence of L tokens is zero-padded to Lpad = cp*Ls and split contiguously over
the cp group: cp rank r holds tokens [r*Ls, (r+1)*Ls). ``SequenceShards`` makes that split,
gathers it back and remembers L. The attention callables fit the seam of
``models/attention.py``: rank-local q, k, v (B, h, Ls, d) -> local output (B, h, Ls, d), equal
to full bidirectional SDPA over the L real tokens. Padding is a suffix of the sequence, so
padding keys are dropped by slicing rather than masked: SDPA never gets a mask tensor (its
fast kernel runs) and no score row can be all -inf. Padding queries get finite outputs that
``SequenceShards.gather`` drops.

Bytes one rank sends per attention call; S = B*h*Ls*d*E is one local K shard (E bytes per
element, h the heads on the rank before CP):
  allgather_kv (Movie Gen)  forward: all-gather K and V           2 (cp-1) S
                            backward: reduce-scatter dK and dV     2 (cp-1) S
  ulysses (DeepSpeed)       forward: all-to-all q, k, v to head shards and the output
                            back (heads must divide by cp)         4 (cp-1)/cp S
                            backward: the inverse all-to-alls      4 (cp-1)/cp S
  ring                      forward: K, V hop cp-1 times           2 (cp-1) S
                            backward: K, V hop cp-1 times and
                            dK, dV cp times (back to their owner)  (4 cp - 2) S
"Sent" is the payload that leaves a rank for its peers under bandwidth-optimal algorithms,
the definition ``parallel.comm_counter`` measures: an all-gather sends its input to each of
the cp-1 peers, a reduce-scatter or an all-to-all sends the (cp-1)/cp of its input that is
addressed to peers, a point-to-point send sends its tensor. ``cp_attention_comm_bytes``
evaluates these formulas.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from models.attention import AttentionFn

# torch 2.13 renamed the flat-buffer collectives; older releases only have the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

MODES = ("allgather_kv", "ulysses", "ring")


class SequenceShards:
    """The contiguous split of one sequence over a cp process group, and the way back.

    ``shard`` records the true length of the tensor it splits; the attention functions read
    it to drop padding keys, so shard the model input before attention runs.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.valid_length: int | None = None
        self.padded_length: int | None = None

    @property
    def local_length(self) -> int:
        """Ls, the tokens each rank holds (padding included)."""
        if self.padded_length is None:
            raise RuntimeError("SequenceShards: call shard(x) on the sequence before attention "
                               "or gather; the padding is only known once a sequence is split")
        return self.padded_length // self.size

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """(..., L, ...) -> this rank's chunk (..., Ls, ...) of x zero-padded to cp*Ls."""
        dim = dim % x.dim()
        length = x.size(dim)
        if length == 0:
            raise ValueError(f"cannot shard an empty sequence (dim {dim} of {tuple(x.shape)})")
        local = -(-length // self.size)
        self.valid_length, self.padded_length = length, local * self.size
        start = min(self.rank * local, length)
        chunk = x.narrow(dim, start, min(local, length - start))
        missing = local - chunk.size(dim)
        if missing == 0:
            return chunk
        zeros = chunk.new_zeros(*chunk.shape[:dim], missing, *chunk.shape[dim + 1:])
        return torch.cat([chunk, zeros], dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """(..., Ls, ...) on every rank -> (..., L, ...), the same on every rank.

        What follows must be replicated over the cp group (every rank computes the same loss
        from the result): backward hands each rank its own slice of the gradient, unsummed.
        """
        dim = dim % x.dim()
        if x.size(dim) != self.local_length:
            raise ValueError(f"gather got {x.size(dim)} tokens along dim {dim} but shard() made "
                             f"chunks of {self.local_length}")
        full = _GatherSequence.apply(x, self.group, dim, False)
        return full.narrow(dim, 0, self.valid_length)

    def valid_in_block(self, block: int) -> int:
        """How many real tokens rank ``block``'s chunk holds; they are its first ones."""
        return max(0, min(self.local_length, self.valid_length - block * self.local_length))

    def row_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(R, Ls, ...) shard -> (R,) fp64 sum of each row over its real tokens on every cp
        rank, padding left out (what ``models.block_cache`` decides on). Under tp x is a
        DTensor whose Ls tokens are split over the tp ranks: DTensor sums those."""
        valid, dims = self.valid_in_block(self.rank), tuple(range(1, x.dim()))
        if isinstance(x, DTensor):
            # the padding is masked, not cut: a narrowed sharded DTensor would be gathered
            real = torch.zeros(1, x.shape[1], *(1,) * (x.dim() - 2), dtype=x.dtype,
                               device=x.to_local().device)
            real[:, :valid] = 1
            real = distribute_tensor(real, x.device_mesh, x.placements, src_data_rank=None)
            sums = (x * real).double().sum(dims).full_tensor()
        else:
            sums = x.narrow(1, 0, valid).double().sum(dims)
        dist.all_reduce(sums, group=self.group)
        return sums


def _gather_along(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """All-gather: (..., Ls, ...) -> (..., cp*Ls, ...), chunks in rank order."""
    size = dist.get_world_size(group)
    flat = x.new_empty(size * x.size(0), *x.shape[1:])
    _all_gather(flat, x.contiguous(), group=group)
    # gloo cannot gather into a stacked (cp, ...) output: gather rank-major along dim 0,
    # then move the rank axis next to ``dim`` and merge the two.
    return flat.unflatten(0, (size, x.size(0))).movedim(0, dim).flatten(dim, dim + 1)


def _reduce_scatter_along(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Reduce-scatter (sum): (..., cp*Ls, ...) -> this rank's (..., Ls, ...)."""
    size = dist.get_world_size(group)
    chunks = x.unflatten(dim, (size, x.size(dim) // size)).movedim(dim, 0).contiguous()
    out = x.new_empty(chunks.shape[1:])
    _reduce_scatter(out, chunks.flatten(0, 1), group=group)
    return out


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim``. Backward reduce-scatters the gradient when ranks use the
    gathered tensor differently (K, V under different queries), or takes this rank's slice
    when the downstream is replicated (the loss)."""

    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _gather_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter_along(grad, ctx.group, ctx.dim), None, None, None
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        local = grad.size(ctx.dim) // size
        return grad.narrow(ctx.dim, rank * local, local), None, None, None


def _check_call(shards: SequenceShards, q: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None:
        raise ValueError("context-parallel attention handles the sequence padding itself and "
                         "does not take a key mask; pass mask=None (a DiT's self-attention "
                         "does) or use plain SDPA for masked attention")
    if q.size(-2) != shards.local_length:
        raise ValueError(f"context-parallel attention got {q.size(-2)} local tokens but the "
                         f"last shard() made chunks of {shards.local_length}; shard the "
                         f"sequence this attention runs on with the same SequenceShards")


def allgather_kv_attention(shards: SequenceShards, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Movie Gen's CP: local queries attend to all-gathered K, V. (B, h, Ls, d) x3 -> same.

    K and V travel in one all-gather; backward reduce-scatters dK, dV.
    """
    _check_call(shards, q, mask)
    kv = _GatherSequence.apply(torch.stack([k, v]), shards.group, 3, True)
    kv = kv.narrow(3, 0, shards.valid_length)
    return F.scaled_dot_product_attention(q, kv[0], kv[1])


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, split_dim: int,
                concat_dim: int) -> torch.Tensor:
    """Chunk p of ``x`` along ``split_dim`` goes to rank p; the chunks received from ranks
    0..cp-1 are concatenated along ``concat_dim``."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=split_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=concat_dim)


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(..., h, Ls, d) sequence shards -> (..., h/cp, cp*Ls, d) head shards."""
    return _all_to_all(x, group, split_dim=-3, concat_dim=-2)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(..., h/cp, cp*Ls, d) head shards -> (..., h, Ls, d) sequence shards."""
    return _all_to_all(x, group, split_dim=-2, concat_dim=-3)


class _SwapShardedDim(torch.autograd.Function):
    """Sequence shards -> head shards (``to_heads``) or back; backward is the reverse swap."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def ulysses_attention(shards: SequenceShards, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSpeed Ulysses: all-to-all to head shards, full attention, all-to-all back.

    (B, h, Ls, d) x3 -> (B, h, Ls, d); h must divide by cp. q, k, v travel in one all-to-all.
    """
    _check_call(shards, q, mask)
    if q.size(1) % shards.size:
        raise ValueError(
            f"ulysses context parallel needs heads divisible by cp: {q.size(1)} local heads, "
            f"cp={shards.size}; change the head count or cp (or tp, which divides the heads), "
            f"or use mode allgather_kv or ring, which take any head count")
    q, k, v = _SwapShardedDim.apply(torch.stack([q, k, v]), shards.group, True).unbind(0)
    length = shards.valid_length
    out = F.scaled_dot_product_attention(q, k.narrow(2, 0, length), v.narrow(2, 0, length))
    return _SwapShardedDim.apply(out, shards.group, False)


class _RingShift:
    """One hop around the ring in flight: x goes to the next rank, the previous rank's
    tensor of the same shape arrives in ``wait()``."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self._sent = x  # the send buffer must outlive the transfer
        if size == 1:  # gloo cannot send to itself; a ring of one hands x back
            self._received, self._works = x, []
            return
        self._received = torch.empty_like(x)
        self._works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, x, group=group, group_peer=(rank + 1) % size),
            dist.P2POp(dist.irecv, self._received, group=group, group_peer=(rank - 1) % size),
        ])

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        return self._received


def _fused_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The fused attention op that returns the log-sum-exp for these inputs: "cpu" (the CPU
    flash kernel), "flash" or "efficient" (CUDA; chosen by the same checks SDPA makes)."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
        # the raw flash op does not pad the head dim to a multiple of 8 as SDPA does
        if q.size(-1) % 8 == 0 and torch.backends.cuda.can_use_flash_attention(params):
            return "flash"
        if torch.backends.cuda.can_use_efficient_attention(params):
            return "efficient"
    raise ValueError(
        f"ring attention found no fused attention kernel for {q.dtype} q, k, v {tuple(q.shape)} "
        f"on {q.device}: it runs on cpu, and on cuda with flash or memory-efficient SDPA "
        f"enabled; use parallel.cp_mode=allgather_kv or ulysses, which call plain SDPA")


def _fused_forward(kernel: str, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, h, Lq, d) over k, v (B, h, Lk, d) -> out (B, h, Lq, d) in q's dtype and its
    log-sum-exp (B, h, Lq) in fp32 (fp64 for fp64 inputs on cpu)."""
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    if kernel == "flash":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        return out, lse
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return out, lse[..., :q.size(2)]  # the kernel pads the LSE rows to a multiple of 32


def _fused_backward(kernel: str, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused backward of q over k, v against a given ``out`` and ``lse`` (B, h, Lq):
    -> dq (B, h, Lq, d), dk, dv (B, h, Lk, d), in q's dtype. With the merged output and LSE
    of all key blocks this is one block's exact share of the full attention's gradient."""
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False)
    # Dropout is 0, so the kernels never read the philox seed and offset; the ops still take
    # them, shaped as their forwards return them.
    if kernel == "flash":
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, False,
            seed, offset)
    seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
    padded_lse = F.pad(lse, (0, -lse.size(-1) % 32))  # the row padding its forward returns
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, None, out, padded_lse, seed, offset, 0.0, [True, True, True, False])
    return dq, dk, dv


def _merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                 block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: attention over some keys (out (B, h, Lq, d), lse (B, h, Lq), fp32)
    and over further keys (block_out, block_lse) -> attention over both, in fp32. An lse of
    -inf (no keys yet) takes the block as it is."""
    merged = torch.logaddexp(lse, block_lse)
    out = (out * torch.exp(lse - merged).unsqueeze(-1)
           + block_out * torch.exp(block_lse - merged).unsqueeze(-1))
    return out, merged


class _RingAttention(torch.autograd.Function):
    """Ring attention on fused kernels: (B, h, Ls, d) x3 -> (B, h, Ls, d).

    At step s, rank r holds the K/V chunk of rank (r - s) mod cp and has already posted the
    hop of that chunk to r + 1, so the transfer overlaps the block's compute. Each block's
    output and LSE come from the fused kernel; they merge in fp32 (online softmax).
    """

    @staticmethod
    def forward(ctx, q, k, v, shards):
        group, size, rank = shards.group, shards.size, shards.rank
        kernel = _fused_kernel(q, k, v)
        merge_dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros_like(q, dtype=merge_dtype)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=merge_dtype, device=q.device)
        kv = torch.stack([k, v])
        for step in range(size):
            hop = _RingShift(kv, group) if step < size - 1 else None
            valid = shards.valid_in_block((rank - step) % size)
            if valid:  # a chunk of pure padding contributes nothing (and never an all -inf row)
                block = _fused_forward(kernel, q, *kv[:, :, :, :valid])
                out, lse = _merge_block(out, lse, *block)
            if hop is not None:
                kv = hop.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shards, ctx.kernel = shards, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Each block's fused backward against the merged output and LSE. K, V circulate as
        in the forward; each rank's dK, dV contribution for the chunk it holds joins the
        partial sum arriving from the previous rank (added in fp32, sent in the input dtype)
        and moves on, reaching the chunk's owner after cp hops.
        """
        q, k, v, out, lse = ctx.saved_tensors
        shards, kernel = ctx.shards, ctx.kernel
        group, size, rank = shards.group, shards.size, shards.rank
        grad_out = grad_out.to(q.dtype)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        kv = torch.stack([k, v])
        partial_dkv = None
        for step in range(size):
            hop = _RingShift(kv, group) if step < size - 1 else None
            valid = shards.valid_in_block((rank - step) % size)
            dkv = torch.zeros_like(kv, dtype=lse.dtype)
            if valid:
                block_dq, block_dk, block_dv = _fused_backward(
                    kernel, grad_out, q, *kv[:, :, :, :valid], out, lse)
                dq += block_dq
                dkv[0, ..., :valid, :] += block_dk
                dkv[1, ..., :valid, :] += block_dv
            if partial_dkv is not None:
                dkv += partial_dkv.wait()
            partial_dkv = _RingShift(dkv.to(k.dtype), group)
            if hop is not None:
                kv = hop.wait()
        dk, dv = partial_dkv.wait()
        return dq.to(q.dtype), dk, dv, None


def ring_attention(shards: SequenceShards, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ring attention: K/V chunks circulate, partial results merge by log-sum-exp.

    (B, h, Ls, d) x3 -> (B, h, Ls, d). Blocks run the device's fused attention kernel in the
    input dtype (on cpu the flash kernel; on cuda flash or memory-efficient, untested on a
    GPU here); outputs, LSEs and gradients accumulate in fp32; K, V and the dK, dV partial
    sums travel in the input dtype.
    """
    _check_call(shards, q, mask)
    return _RingAttention.apply(q, k, v, shards)


_MODE_FNS = {"allgather_kv": allgather_kv_attention, "ulysses": ulysses_attention,
             "ring": ring_attention}


def context_parallel_attention(mode: str, shards: SequenceShards) -> AttentionFn:
    """The seam's ``(q, k, v, mask) -> out`` for a CP mode: allgather_kv, ulysses or ring."""
    if mode not in _MODE_FNS:
        raise ValueError(f"unknown context-parallel attention mode {mode!r}; "
                         f"choose one of {', '.join(MODES)}")
    return partial(_MODE_FNS[mode], shards)


def cp_attention_comm_bytes(mode: str, batch: int, heads: int, padded_length: int,
                            head_dim: int, cp: int, element_size: int) -> dict[str, int]:
    """Bytes one rank sends in one attention call: {"forward", "backward", "total"}.

    ``heads`` are the heads on the rank before CP (after tensor parallel), ``padded_length``
    is Lpad = cp*Ls; "sent" as defined in the module docstring.
    """
    if mode not in _MODE_FNS:
        raise ValueError(f"unknown context-parallel attention mode {mode!r}; "
                         f"choose one of {', '.join(MODES)}")
    shard = batch * heads * padded_length * head_dim // cp * element_size  # one local K
    if mode == "allgather_kv":
        forward = backward = 2 * (cp - 1) * shard
    elif mode == "ulysses":
        forward = backward = 4 * (cp - 1) * shard // cp
    else:
        forward, backward = 2 * (cp - 1) * shard, (4 * cp - 2) * shard
    return {"forward": forward, "backward": backward, "total": forward + backward}
