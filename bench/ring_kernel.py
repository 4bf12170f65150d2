"""Ring attention's kernel: the fused-kernel ring against the hand-written fp32 tiled one.

One process simulates one rank of a cp = 2 ring: a ``SequenceShards`` of size 2 over a
one-process gloo group, whose K/V hops hand back the rank's own chunk. Each call is the
product's ``ring_attention`` forward + backward with the rank's real step count and shapes
(Ls = tokens/2 queries against two chunks of Ls keys), minus the transfers; its values are
not the full attention's (the rank meets its own chunk twice), only time and memory are
measured. "tiled fp32" is the kernel ring mode ran before issue 13 item 6, kept here
unchanged as the baseline: fp32 score tiles of at most 2^24 elements, merged by
log-sum-exp, the backward recomputing the probabilities tile by tile. "fused" is today's
``parallel.context_parallel`` ring: the CPU flash kernel that returns the LSE, merged in
fp32, and its fused backward against the merged output and LSE.

Per point, in a fresh process (so its peak RSS is its own): the median CPU seconds of the
timed calls (process time: on shared cores wall time mostly measures the other jobs; the
wall median is printed beside it), the peak resident memory over the RSS before the first
call (getrusage: every allocation, inside kernels too) and the peak of the live tensor
storages that ops return (LiveBytes), both taken during the first, untimed call.
Run from the repository root, on one core:
    taskset -c 0 python bench/ring_kernel.py                 # 2K, 8K, 16K tokens, 4 heads
    taskset -c 0 python bench/ring_kernel.py --tokens 1024 2048 --heads 1 --calls 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mesh import LiveBytes, peak_rss_mib, rss_mib, run_point  # noqa: E402
from parallel.context_parallel import SequenceShards, _RingShift, ring_attention  # noqa: E402

CP, BATCH, HEAD_DIM = 2, 1, 64
KERNELS = ("tiled fp32", "fused")
SCORE_TILE_ELEMENTS = 1 << 24  # the baseline's fp32 scores per tile: 64 MiB


def _query_tiles(q: torch.Tensor, keys: int) -> list[slice]:
    """Baseline: row ranges of the queries whose scores (B, h, rows, keys) fit one tile."""
    batch, heads, length = q.shape[:3]
    rows = max(1, SCORE_TILE_ELEMENTS // max(1, batch * heads * keys))
    return [slice(start, min(start + rows, length)) for start in range(0, length, rows)]


class TiledRingAttention(torch.autograd.Function):
    """Baseline: the fp32 tiled ring attention that ``ring_attention`` replaced, unchanged.
    (B, h, Ls, d) x3 -> (B, h, Ls, d)."""

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
            if valid:
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


class SimulatedRing(SequenceShards):
    """Rank 0 of a cp-rank ring whose hops, on a one-process group, hand back its own chunk."""

    def __init__(self, cp: int):
        super().__init__(dist.group.WORLD)
        self.size = cp


def point(kernel: str, tokens: int, heads: int, calls: int) -> dict[str, float]:
    """In this process: ``calls`` timed forward + backward calls after one measured one."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    shards = SimulatedRing(CP)
    generator = torch.Generator().manual_seed(tokens)
    q, k, v, weight = (shards.shard(torch.randn(BATCH, heads, tokens, HEAD_DIM,
                                                generator=generator), dim=2) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def call():
        if kernel == "fused":
            out = ring_attention(shards, q, k, v)
        else:
            out = TiledRingAttention.apply(q, k, v, shards)
        (out * weight).sum().backward()
        for t in (q, k, v):
            t.grad = None

    gc.collect()
    rss_before = rss_mib()
    with LiveBytes() as live:
        call()
    rss_growth = peak_rss_mib() - rss_before
    cpu, wall = [], []
    for _ in range(calls):
        cpu_began, wall_began = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - cpu_began)
        wall.append(time.perf_counter() - wall_began)
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall),
            "rss_growth": rss_growth, "live": live.peak / 2**20}


def table(tokens_list: list[int], results: dict[tuple[str, int], dict]) -> str:
    lines = ["| tokens (Ls per rank) | kernel | fwd+bwd CPU s/call | speedup | wall s/call "
             "| peak RSS growth MiB | peak live tensors MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for tokens in tokens_list:
        base = results["tiled fp32", tokens]["cpu"]
        for kernel in KERNELS:
            r = results[kernel, tokens]
            lines.append(f"| {tokens:,} ({tokens // CP:,}) | {kernel} | {r['cpu']:.2f} "
                         f"| {base / r['cpu']:.2f}x | {r['wall']:.2f} | {r['rss_growth']:,.0f} "
                         f"| {r['live']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384],
                        help="sequence lengths, split over the cp = 2 ranks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of 64")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per point")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        (kernel, tokens, heads), calls = json.loads(args.point)
        print(json.dumps(point(kernel, int(tokens), int(heads), calls)))
        return
    tokens_list = args.tokens
    began = time.perf_counter()
    results = {}
    for tokens in tokens_list:
        for kernel in KERNELS:
            print(f"{kernel} at {tokens} tokens ...", file=sys.stderr, flush=True)
            results[kernel, tokens] = run_point(__file__, [kernel, str(tokens), str(args.heads)],
                                                args.calls)
            print(f"  {results[kernel, tokens]}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); one process "
          f"simulating rank 0 of a cp={CP} ring (2 steps, no transfers); B={BATCH}, "
          f"{args.heads} head(s) of {HEAD_DIM}, fp32 inputs; median of {args.calls} timed "
          f"call(s) after the measured one\n")
    print(table(tokens_list, results))
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
