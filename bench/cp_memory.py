"""Activation memory per rank against tokens per sample, for context parallel cp = 1, 2, 4.

Each point is one forward + flow-matching loss + backward of one sample through the
product path (``trainer.build.build_model``: CP token sharding and CP attention, FSDP2 over
the cp ranks) in cp gloo processes sharing the machine's 2 cores. Per rank it reports:
  - saved for backward inside the DiT blocks: the activations CP shards (SavedBytes);
  - saved for backward in all: plus what every cp rank holds whole (the latent, noise,
    patch tokens before sharding, the gathered output and the loss);
  - peak live tensor bytes during forward + backward (LiveBytes: activations, temporaries,
    gradients, communication buffers);
  - process RSS: the peak (getrusage) and its growth over the RSS before the step, a
    sanity check that includes the allocator's slack and everything Python holds.
Ratios are to cp = 1 at the same token count. The blocks' activations fall as 1/cp, except
under allgather_kv the gathered K and V (2·L·width per layer, the whole sequence), which
SDPA saves for its backward on every rank: with f that share of the cp = 1 bytes, the
expected ratio is (1 - f)/cp + f (1/cp for ulysses and ring).

Run from the repository root:
    python bench/cp_memory.py            # 4K, 8K, 16K tokens, ~75 s on 2 idle cores
    python bench/cp_memory.py --quick    # 1K, 2K tokens, ~50 s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mesh import TINY_TEXT, compose, measured_step, mib, start  # noqa: E402

# Narrow width, 2 heads of 32 (the SDPA head_dim), SwiGLU hidden 4x width.
WIDTH, DEPTH = 64, 2
MODEL = [f"model.width={WIDTH}", f"model.depth={DEPTH}", "model.heads=2", "model.ffn_dim=256",
         "model.max_patches_t=32", "model.max_patches_h=48", "model.max_patches_w=48",
         "recipe.batch_size=1", *TINY_TEXT]
SIDE = 128  # pixels: the identity autoencoder folds 2x2, patches 2x2 -> 32 x 32 per frame
CPS = (1, 2, 4)


def overrides(frames: int, cp: int, mode: str) -> list[str]:
    return MODEL + [f"data.frames={frames}", f"data.height={SIDE}", f"data.width={SIDE}",
                    f"parallel.cp={cp}", f"parallel.cp_mode={mode}"]


def measure(frames: int, cp: int, mode: str) -> dict[str, float]:
    cfg = compose(overrides(frames, cp, mode))
    ctx, model = start(cfg, cp)
    return measured_step(cfg, ctx, model)


def expected_ratio(mode: str, tokens: int, cp: int, blocks_cp1: float) -> float:
    """Blocks' saved bytes at cp over cp = 1: sharded, but for allgather_kv's gathered K, V."""
    gathered = 2 * tokens * WIDTH * 4 * DEPTH if mode == "allgather_kv" and cp > 1 else 0
    share = gathered / blocks_cp1
    return (1 - share) / cp + share


def table(results: dict[tuple[int, int], dict[str, float]], mode: str) -> str:
    lines = ["| tokens | cp | tokens/rank | saved in blocks MiB | ×cp1 | expected "
             "| saved total MiB | ×cp1 | peak live MiB | ×cp1 | peak RSS MiB | RSS growth MiB "
             "| step s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (tokens, cp), r in results.items():
        base = results.get((tokens, 1))
        ratio = {key: f"{r[key] / base[key]:.2f}" if base else "-"
                 for key in ("saved_blocks", "saved", "live")}
        expected = (f"{expected_ratio(mode, tokens, cp, base['saved_blocks']):.2f}"
                    if base else "-")
        lines.append(
            f"| {tokens:,} | {cp} | {-(-tokens // cp):,} | {mib(r['saved_blocks'])} "
            f"| {ratio['saved_blocks']} | {expected} | {mib(r['saved'])} | {ratio['saved']} "
            f"| {mib(r['live'])} | {ratio['live']} | {r['rss_peak']:,.0f} "
            f"| {r['rss_peak'] - r['rss_before']:,.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1K and 2K tokens")
    parser.add_argument("--mode", default="allgather_kv",
                        choices=("allgather_kv", "ulysses", "ring"))
    args = parser.parse_args()
    from tests.distributed import run_distributed

    began = time.perf_counter()
    frames_list = (1, 2) if args.quick else (4, 8, 16)
    results = {}
    for frames in frames_list:
        tokens = frames * (SIDE // 4) ** 2
        for cp in CPS:
            print(f"{tokens} tokens, cp={cp} ...", file=sys.stderr, flush=True)
            ranks = run_distributed(measure, cp, frames, cp, args.mode, timeout=900)
            results[(tokens, cp)] = {key: max(r[key] for r in ranks) for key in ranks[0]}
    print(f"torch {torch.__version__}, gloo, fp32, CP mode {args.mode}; DiT width {WIDTH}, "
          f"depth {DEPTH}, "
          "2 heads, ffn 256; batch 1; per rank, the maximum over ranks; cp ranks share "
          "2 cores (1 thread each, 2 threads at cp=1)\n")
    print(table(results, args.mode))
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
