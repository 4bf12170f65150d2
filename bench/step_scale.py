"""The scale plan of ``bench/step.py --plan scale`` (the default on CUDA): our DiT at
dit_1b's size at 256 px, then twice the latent frames and twice again until a step runs out
of memory, passes --max-tokens or takes longer than --max-step-s; tokens/s, counted FLOP/s,
MFU against the GPU's dense bf16 peak (``parallel.plan.GPUS``) and peak memory per point.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from omegaconf import OmegaConf

from bench.step import (
    CONTEXT,
    REPO,
    Case,
    Result,
    measure_peaks,
    peak_of,
    run_case,
)
from parallel.plan import GPUS


def scale_cases(args: argparse.Namespace) -> list[Case]:
    """The 256 px point, then twice its latent frames, and twice again, to --max-tokens."""
    model = OmegaConf.load(REPO / args.model)
    width = args.width or model.width
    first = Case(width, args.depth or model.depth, tuple(args.latent), args.dtype,
                 num_heads=args.heads or model.heads, ffn=args.ffn_dim or model.ffn_dim)
    cases = [first]
    while cases[-1].tokens * 2 <= args.max_tokens:
        t, h, w = cases[-1].latent
        cases.append(Case(first.width, first.depth, (2 * t, h, w), first.dtype,
                          first.num_heads, first.ffn))
    return cases


def gpu_peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """The GPU's dense bf16 peak (FLOP/s) from the planner's table, and where it came from."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    name = torch.cuda.get_device_name(device)
    # the table's H100 is the SXM part; a PCIe H100 (~756 TFLOP/s) needs --peak-tflops
    for key, gpu in GPUS.items():
        if key in name.lower():
            return gpu.bf16_tflops * 1e12, f"{gpu.name} bf16 dense (parallel.plan.GPUS)"
    raise SystemExit(f"{name!r} matches none of parallel.plan.GPUS ({', '.join(GPUS)}); "
                     f"give its dense bf16 peak with --peak-tflops")


def run_scale(args: argparse.Namespace, device: torch.device) -> tuple[list[Result], str]:
    """Run the scale cases in order until one runs out of memory or takes too long; the
    results that fit and a line saying why the search stopped."""
    results: list[Result] = []
    for case in scale_cases(args):
        print(f"{case} ...", file=sys.stderr, flush=True)
        try:
            results += run_case(case, with_peer=False, budget_s=args.budget_s, device=device)
        except torch.cuda.OutOfMemoryError:
            stop = f"{case.tokens:,} tokens ran out of GPU memory"
            break
        if results[-1].seconds > args.max_step_s:
            stop = f"a step took more than --max-step-s {args.max_step_s:g} s"
            break
    else:
        stop = f"--max-tokens {args.max_tokens:,} reached"
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the failed case held, before anything runs after us
    return results, stop


def scale_table(results: list[Result], peak: float) -> str:
    """One row per point; the closed form sits beside the count so that an attention kernel
    FlopCounterMode has no formula for (counted as 0) shows up as a gap."""
    lines = ["| dtype | width | depth | heads | ffn | tokens | latent T,H,W | reps | step ms "
             "| tokens/s | GFLOP counted | GFLOP 3x analytic | TFLOP/s | MFU | peak mem GiB |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c, rate = r.case, r.flops / r.seconds
        memory = f"{r.peak_bytes / 2**30:.1f}" if r.peak_bytes is not None else "-"
        lines.append(
            f"| {c.dtype} | {c.width} | {c.depth} | {c.heads} | {c.ffn_dim} | {c.tokens:,} "
            f"| {','.join(map(str, c.latent))} | {r.reps} | {1e3 * r.seconds:.1f} "
            f"| {c.tokens / r.seconds:,.0f} | {r.flops / 1e9:,.1f} | {r.analytic / 1e9:,.1f} "
            f"| {rate / 1e12:.2f} "
            f"| {rate / peak:.3f} | {memory} |")
    return "\n".join(lines)


def main_scale(args: argparse.Namespace, device: torch.device) -> None:
    began = time.perf_counter()
    if device.type == "cuda":
        peak, source = gpu_peak_flops(device, args.peak_tflops)
    else:  # no table for CPUs: the measured matmul peak of the plan's dtype
        peak = peak_of(args.dtype, [measure_peaks(quick=True, device=device)])
        source = f"measured {args.dtype} torch.mm peak of this CPU"
    results, stop = run_scale(args, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"torch {torch.__version__}, {where}; peak {peak / 1e12:.3g} TFLOP/s ({source})\n")
    print(scale_table(results, peak) + "\n")
    longest = f"{results[-1].case.tokens:,} tokens" if results else "nothing fit"
    print(f"Longest sequence that fit: {longest}; the search stopped: {stop}.")
    print(f"Step = forward + MSE loss + backward, no optimizer, batch 1, {CONTEXT} text tokens, "
          f"best of reps; FLOPs counted by FlopCounterMode (MFU = counted FLOP/s / peak); "
          f"peak memory includes the fp32 weights and gradients; no activation "
          f"checkpointing.")
    print(f"\nwall time {time.perf_counter() - began:.0f} s")
