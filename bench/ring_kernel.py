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

``--versus-sdpa`` times the context-parallel modes against one SDPA call over the full
sequence instead: ``allgather_kv``, ``ulysses`` and ``ring`` as the product runs them on a
one-process group (cp = 1: real code paths and collectives of one rank, so the row is the
mode's overhead over SDPA, not a cp > 1 rank's share of the work), and ``ring`` as rank 0
of the simulated cp = 2 ring above (half the queries: ideal is half of SDPA's time).
allgather_kv and ulysses cannot simulate a cp = 2 rank in one process (their collectives
would have to hand back other ranks' chunks), so they are not shown at cp = 2.
``--device cuda`` runs either table on the GPU (nccl group; timing by CUDA events after a
synchronize, memory by ``torch.cuda.max_memory_allocated`` above the inputs), e.g.
    python bench/ring_kernel.py --device cuda --dtype bf16 --versus-sdpa --heads 16
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mesh import LiveBytes, peak_rss_mib, rss_mib, run_point  # noqa: E402
from parallel.context_parallel import (  # noqa: E402
    SequenceShards,
    _RingShift,
    context_parallel_attention,
    ring_attention,
)

CP, BATCH, HEAD_DIM = 2, 1, 64
KERNELS = ("tiled fp32", "fused")
# --versus-sdpa rows: the label, and the cp the rank's sequence is split over
SDPA = "sdpa (full sequence)"
MODE_ROWS = {SDPA: 1, "allgather_kv cp=1": 1, "ulysses cp=1": 1, "ring cp=1": 1,
             "ring cp=2 (rank 0)": CP}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


def start_group(device: torch.device) -> None:
    """A one-process group: gloo on the CPU, nccl on a GPU (gloo has no CUDA all-to-all)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def attention(kernel: str) -> tuple[SequenceShards, Callable[..., torch.Tensor]]:
    """The shards and ``(q, k, v) -> out`` of a row; the shards split the sequence."""
    if kernel in KERNELS:
        ring = SimulatedRing(CP)
        if kernel == "fused":
            return ring, partial(ring_attention, ring)
        return ring, lambda q, k, v: TiledRingAttention.apply(q, k, v, ring)
    if kernel == SDPA:
        return SequenceShards(dist.group.WORLD), F.scaled_dot_product_attention
    mode, cp = kernel.split()[0], MODE_ROWS[kernel]
    shards = SimulatedRing(cp) if cp > 1 else SequenceShards(dist.group.WORLD)
    return shards, context_parallel_attention(mode, shards)


def timed(call: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(device seconds, wall seconds) of one call: CPU process time on the CPU (on shared
    cores wall time mostly measures the other jobs), CUDA-event time on a GPU."""
    if device.type != "cuda":
        cpu_began, wall_began = time.process_time(), time.perf_counter()
        call()
        return time.process_time() - cpu_began, time.perf_counter() - wall_began
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    wall_began = time.perf_counter()
    start.record()
    call()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3, time.perf_counter() - wall_began


def point(kernel: str, tokens: int, heads: int, calls: int, device_name: str = "cpu",
          dtype: str = "fp32") -> dict[str, float]:
    """In this process: ``calls`` timed forward + backward calls after one measured one."""
    device = torch.device(device_name)
    start_group(device)
    shards, attend = attention(kernel)
    generator = torch.Generator().manual_seed(tokens)
    q, k, v, weight = (shards.shard(torch.randn(BATCH, heads, tokens, HEAD_DIM,
                                                generator=generator), dim=2)
                       .to(device, DTYPES[dtype]) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def call():
        (attend(q, k, v) * weight).sum().backward()
        for t in (q, k, v):
            t.grad = None

    gc.collect()
    rss_before = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with LiveBytes() as live:
        call()
    rss_growth = peak_rss_mib() - rss_before
    device_peak = (torch.cuda.max_memory_allocated(device) - inputs_bytes
                   if device.type == "cuda" else 0)
    cpu, wall = zip(*(timed(call, device) for _ in range(calls)), strict=True)
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall),
            "rss_growth": rss_growth, "live": live.peak / 2**20,
            "device_peak": device_peak / 2**20}


def table(tokens_list: list[int], results: dict[tuple[str, int], dict],
          device: torch.device) -> str:
    # on a GPU the clock is CUDA events and the host's RSS says nothing: its peak memory
    clock, memory = (("CUDA-event", "peak CUDA MiB") if device.type == "cuda"
                     else ("CPU", "peak RSS growth MiB"))
    lines = [f"| tokens (Ls per rank) | kernel | fwd+bwd {clock} s/call | speedup | wall s/call "
             f"| {memory} | peak live tensors MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for tokens in tokens_list:
        base = results["tiled fp32", tokens]["cpu"]
        for kernel in KERNELS:
            r = results[kernel, tokens]
            held = r["device_peak"] if device.type == "cuda" else r["rss_growth"]
            lines.append(f"| {tokens:,} ({tokens // CP:,}) | {kernel} | {r['cpu']:.2f} "
                         f"| {base / r['cpu']:.2f}x | {r['wall']:.2f} | {held:,.0f} "
                         f"| {r['live']:,.0f} |")
    return "\n".join(lines)


def sdpa_table(tokens_list: list[int], results: dict[tuple[str, int], dict],
               device: torch.device) -> str:
    """--versus-sdpa: per row, time against SDPA's and against SDPA's share of a cp rank."""
    clock = "CUDA-event ms" if device.type == "cuda" else "CPU ms"
    memory = "peak CUDA MiB" if device.type == "cuda" else "peak live tensors MiB"
    lines = [f"| tokens | mode | queries x keys per call | fwd+bwd {clock} | / SDPA "
             f"| / (SDPA / cp) | {memory} |", "|---|---|---|---:|---:|---:|---:|"]
    for tokens in tokens_list:
        base = results[SDPA, tokens]["cpu"]
        for kernel, cp in MODE_ROWS.items():
            r = results[kernel, tokens]
            mem = r["device_peak"] if device.type == "cuda" else r["live"]
            lines.append(f"| {tokens:,} | {kernel} | {tokens // cp:,} x {tokens:,} "
                         f"| {1e3 * r['cpu']:.2f} | {r['cpu'] / base:.2f} "
                         f"| {r['cpu'] * cp / base:.2f} | {mem:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384],
                        help="sequence lengths, split over the cp = 2 ranks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of 64")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per point")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="of q, k, v (flash attention on a GPU needs bf16)")
    parser.add_argument("--versus-sdpa", action="store_true",
                        help="time the cp modes against SDPA of the full sequence")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        (kernel, tokens, heads, device, dtype), calls = json.loads(args.point)
        print(json.dumps(point(kernel, int(tokens), int(heads), calls, device, dtype)))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    kernels = tuple(MODE_ROWS) if args.versus_sdpa else KERNELS
    tokens_list = args.tokens
    began = time.perf_counter()
    results = {}
    for tokens in tokens_list:
        for kernel in kernels:
            print(f"{kernel} at {tokens} tokens ...", file=sys.stderr, flush=True)
            results[kernel, tokens] = run_point(
                __file__, [kernel, str(tokens), str(args.heads), args.device, args.dtype],
                args.calls)
            print(f"  {results[kernel, tokens]}", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{torch.get_num_threads()} thread(s)")
    if args.versus_sdpa:
        print(f"torch {torch.__version__}, {where}; one process; B={BATCH}, {args.heads} "
              f"head(s) of {HEAD_DIM}, {args.dtype} inputs; median of {args.calls} timed "
              f"call(s) after the measured one. cp=1 rows: the product's mode on a one-process "
              f"group; ring cp=2 (rank 0): one rank of a simulated cp={CP} ring, no transfers; "
              f"allgather_kv and ulysses cannot simulate a cp=2 rank in one process: not "
              f"shown\n")
        print(sdpa_table(tokens_list, results, device))
    else:
        print(f"torch {torch.__version__}, {where}; one process simulating rank 0 of a "
              f"cp={CP} ring (2 steps, no transfers); B={BATCH}, {args.heads} head(s) of "
              f"{HEAD_DIM}, {args.dtype} inputs; median of {args.calls} timed call(s) after "
              f"the measured one\n")
        print(table(tokens_list, results, device))
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
