"""The long-context proof: one 73,728-token sample through a DiT block stack with CP on CPU.

One sample of 32 frames at 192 x 192 pixels: the identity autoencoder folds 2x2 into a
12-channel 32 x 96 x 96 latent, 2x2 patches make 32 x 48 x 48 = 73,728 tokens (Movie Gen's
768 px / 256 frames grid; its TAE would give 16 channels, which changes only the patch
embedding and output widths). Forward + flow-matching loss + backward, fp32, through the
product path (``trainer.build.build_model``: CP token sharding, allgather_kv attention on
SDPA's flash kernel, FSDP2 over the cp ranks), in cp = 2 gloo processes on the 2 cores.
Per rank: step time, bytes saved for backward (inside the blocks and in all), peak live
tensor bytes and RSS (see bench/_mesh.py). cp = 1 runs the same step in one process with
both cores (``--skip-cp1`` leaves it out and prints cp = 2 x 2 as an estimate instead).

Run from the repository root:
    python bench/long_context.py             # depth 1: cp=2 then cp=1, ~100 s on 2 idle cores
    python bench/long_context.py --depth 2   # ~200 s
    python bench/long_context.py --quick     # 4 frames (9,216 tokens), ~20 s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mesh import TINY_TEXT, compose, measured_step, mib, start  # noqa: E402

SIDE = 192  # pixels -> 96 x 96 latent -> 48 x 48 patches
MODEL = ["model.width=64", "model.heads=2", "model.ffn_dim=256", "model.max_patches_t=32",
         "model.max_patches_h=48", "model.max_patches_w=48", "recipe.batch_size=1",
         f"data.height={SIDE}", f"data.width={SIDE}", "parallel.cp_mode=allgather_kv",
         *TINY_TEXT]


def overrides(frames: int, depth: int, cp: int) -> list[str]:
    return MODEL + [f"data.frames={frames}", f"model.depth={depth}", f"parallel.cp={cp}"]


def measure(frames: int, depth: int, cp: int) -> dict[str, float]:
    cfg = compose(overrides(frames, depth, cp))
    ctx, model = start(cfg, cp)
    return measured_step(cfg, ctx, model)


def row(label: str, r: dict[str, float], tokens: int, rank_tokens: int) -> str:
    return (f"| {label} | {tokens:,} | {rank_tokens:,} | {r['seconds']:.1f} "
            f"| {tokens / r['seconds']:,.0f} | {mib(r['saved_blocks'])} | {mib(r['saved'])} "
            f"| {mib(r['live'])} | {r['rss_peak']:,.0f} | {r['rss_peak'] - r['rss_before']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 frames: 9,216 tokens")
    parser.add_argument("--depth", type=int, default=1, help="DiT blocks (default 1)")
    parser.add_argument("--skip-cp1", action="store_true",
                        help="do not run cp=1; estimate it from the cp=2 ranks")
    args = parser.parse_args()
    from tests.distributed import run_distributed

    began = time.perf_counter()
    frames = 4 if args.quick else 32
    tokens = frames * (SIDE // 4) ** 2
    lines = ["| run | tokens | tokens/rank | fwd+bwd s | tokens/s | saved in blocks MiB "
             "| saved total MiB | peak live MiB | peak RSS MiB | RSS growth MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print(f"cp=2, {tokens} tokens ...", file=sys.stderr, flush=True)
    ranks = run_distributed(measure, 2, frames, args.depth, 2, timeout=1800)
    for rank, r in enumerate(ranks):
        lines.append(row(f"cp=2 rank {rank} (1 thread)", r, tokens, tokens // 2))
    if args.skip_cp1:
        # Not measured: the blocks' sharded activations double, the rest stays; time ~ the
        # same total work on the same 2 cores.
        worst = {key: max(r[key] for r in ranks) for key in ranks[0]}
        lines.append(f"| cp=1 estimate (not run) | {tokens:,} | {tokens:,} "
                     f"| ~{worst['seconds']:.0f} | - | < {mib(2 * worst['saved_blocks'])} "
                     f"| < {mib(2 * worst['saved'])} | < {mib(2 * worst['live'])} | - | - |")
    else:
        print(f"cp=1, {tokens} tokens ...", file=sys.stderr, flush=True)
        single = run_distributed(measure, 1, frames, args.depth, 1, timeout=1800)[0]
        lines.append(row("cp=1 (2 threads)", single, tokens, tokens))
    print(f"torch {torch.__version__}, gloo, fp32; DiT width 64, depth {args.depth}, 2 heads "
          f"(head dim 32), ffn 256; latent 12 x {frames} x 96 x 96 -> {frames} x 48 x 48 "
          "patches; one sample; forward + loss + backward, no optimizer\n")
    print("\n".join(lines))
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
