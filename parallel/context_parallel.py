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


SCORE_TILE_ELEMENTS = 1 << 24  # fp32 scores per tile: 64 MiB, whatever the sequence length


def _query_tiles(q: torch.Tensor, keys: int) -> list[slice]:
    """Row ranges of the local queries such that one tile's scores (B, h, rows, keys) stay
    under SCORE_TILE_ELEMENTS: ring memory does not grow with Ls²."""
    batch, heads, length = q.shape[:3]
    rows = max(1, SCORE_TILE_ELEMENTS // max(1, batch * heads * keys))
    return [slice(start, min(start + rows, length)) for start in range(0, length, rows)]


class _RingAttention(torch.autograd.Function):
    """Ring attention in fp32 math, tiled over queries: (B, h, Ls, d) x3 -> (B, h, Ls, d).

    At step s, rank r holds the K/V chunk of rank (r - s) mod cp and has already posted the
    hop of that chunk to r + 1, so the transfer overlaps the block's compute.
    """

    @staticmethod
    def forward(ctx, q, k, v, shards):
        group, size, rank = shards.group, shards.size, shards.rank
        scale = 1.0 / math.sqrt(q.size(-1))
        qf = q.float()
        out = torch.zeros_like(qf)
        lse = torch.full((*q.shape[:-1], 1), -math.inf, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(size):
            hop = _RingShift(kv, group) if step < size - 1 else None
            valid = shards.valid_in_block((rank - step) % size)
            if valid:  # a chunk of pure padding contributes nothing (and never an all -inf row)
                kb, vb = kv[:, :, :, :valid].float()
                for rows in _query_tiles(q, valid):
                    scores = qf[..., rows, :] @ kb.transpose(-1, -2) * scale
                    block_lse = scores.logsumexp(-1, keepdim=True)
                    block_out = torch.exp(scores - block_lse) @ vb
                    merged = torch.logaddexp(lse[..., rows, :], block_lse)
                    out[..., rows, :] = (out[..., rows, :] * torch.exp(lse[..., rows, :] - merged)
                                         + block_out * torch.exp(block_lse - merged))
                    lse[..., rows, :] = merged
            if hop is not None:
                kv = hop.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shards, ctx.scale = shards, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        """Flash-attention backward against the saved global LSE. K, V circulate as in the
        forward; each rank's dK, dV contribution for the chunk it holds joins the partial sum
        arriving from the previous rank and moves on, reaching the chunk's owner after cp hops.
        """
        q, k, v, out, lse = ctx.saved_tensors
        shards, scale = ctx.shards, ctx.scale
        group, size, rank = shards.group, shards.size, shards.rank
        qf, dout = q.float(), grad_out.float()
        delta = (dout * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v])
        partial_dkv = None
        for step in range(size):
            hop = _RingShift(kv, group) if step < size - 1 else None
            valid = shards.valid_in_block((rank - step) % size)
            dkv = torch.zeros_like(kv, dtype=torch.float32)
            if valid:
                kb, vb = kv[:, :, :, :valid].float()
                for rows in _query_tiles(q, valid):
                    q_rows, dout_rows = qf[..., rows, :], dout[..., rows, :]
                    p = torch.exp(q_rows @ kb.transpose(-1, -2) * scale - lse[..., rows, :])
                    ds = p * (dout_rows @ vb.transpose(-1, -2) - delta[..., rows, :])
                    dq[..., rows, :] += scale * (ds @ kb)
                    dkv[0, ..., :valid, :] += scale * (ds.transpose(-1, -2) @ q_rows)
                    dkv[1, ..., :valid, :] += p.transpose(-1, -2) @ dout_rows
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

    (B, h, Ls, d) x3 -> (B, h, Ls, d). Blocks are computed in fp32 math in query tiles of
    at most SCORE_TILE_ELEMENTS scores; K, V and the dK, dV partial sums travel in the input
    dtype.
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
