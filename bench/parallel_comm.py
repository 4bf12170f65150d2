"""Bytes each rank sends in one training step, per parallelism, measured against formulas.

For each mesh, gloo processes run the real ``trainer.train.train_step`` (forward, loss,
backward, grad-norm clipping, AdamW, EMA) of a tiny text-to-video DiT built by
``trainer.build.build_model`` (so TP/SP, CP attention and FSDP2 are the product's) under
``parallel.comm_counter.CommCounter``, which also sees the collectives DTensor issues inside
its own op dispatch (implicit redistributions). Next to the measurement: the bytes derived
from the plans (``analytic``: ``parallel.plan_comm``, the planner's formulas), term by term,
and their ratio.

The 27-token patch grid (3 x 3 x 3) is deliberately not a multiple of 2 or 4, so the
padding of CP shards, DTensor's uneven sequence shards and FSDP2's dim-0 padding are all
exercised. Run from the repository root:
    python bench/parallel_comm.py            # 10 meshes, ~80 s on 2 idle cores
    python bench/parallel_comm.py --quick    # TP/SP, FSDP, CP allgather_kv at 2 ranks, ~25 s
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mesh import TINY_TEXT, compose, start, video_batch  # noqa: E402
from parallel.comm_counter import CommCounter  # noqa: E402

BASE = ["model.width=32", "model.depth=2", "model.heads=4", "model.ffn_dim=48",
        "data.frames=3", "data.height=12", "data.width=12", "recipe.batch_size=2", *TINY_TEXT]
CAPTIONS = ["a red square moving left", "a blue circle"]
E = 4  # fp32 bytes per element: parameters, activations and gradients


@dataclass(frozen=True)
class Mesh:
    name: str
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    cp_mode: str = "allgather_kv"

    @property
    def world(self) -> int:
        return self.dp_shard * self.cp * self.tp

    @property
    def label(self) -> str:
        dims = [f"{d}={getattr(self, d)}" for d in ("dp_shard", "cp", "tp") if getattr(self, d) > 1]
        return " × ".join(dims)

    @property
    def overrides(self) -> list[str]:
        return [f"parallel.dp_shard={self.dp_shard}", f"parallel.cp={self.cp}",
                f"parallel.tp={self.tp}", f"parallel.cp_mode={self.cp_mode}"]


MESHES = [Mesh("TP/SP", tp=2), Mesh("FSDP", dp_shard=2)] + [
    Mesh(f"CP {mode}", cp=cp, cp_mode=mode)
    for cp in (2, 4) for mode in ("allgather_kv", "ulysses", "ring")] + [
    Mesh("TP/SP + CP allgather_kv", cp=2, tp=2), Mesh("FSDP + TP/SP", dp_shard=2, tp=2)]
QUICK = [MESHES[0], MESHES[1], MESHES[2]]


def measure(mesh: Mesh) -> dict[str, int]:
    """In each rank: one real train step under CommCounter; bytes sent per kind."""
    from parallel.engine import NativeEngine
    from trainer.ema import EMA
    from trainer.optim import build_optimizer
    from trainer.t2v_task import TextToVideoTask
    from trainer.train import train_step

    cfg = compose(BASE + mesh.overrides)
    ctx, model = start(cfg, mesh.world)
    engine = NativeEngine(model, lambda params: build_optimizer(params, cfg.recipe, 10,
                                                               fused=True))
    ema = EMA(engine.ema_tensors(), cfg.recipe.ema_decay)
    task = TextToVideoTask(cfg, ctx)
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    batch = {"video": video_batch(cfg)[rows], "caption": CAPTIONS[rows]}
    with CommCounter() as counter:
        train_step(cfg, 1, batch, engine, task, ema, ctx)
    return dict(counter.sent)


# ---------------------------------------------------------------- the formulas
# parallel.plan_comm.step_comm_terms: the planner's formulas, checked here.

PHASES = {"forward": "fwd", "backward": "bwd", "step": "opt"}


def token_count(cfg) -> int:
    """Video tokens of one sample: pixels folded by the identity autoencoder, then patches."""
    from models.dit import patch_grid

    s2d, m = cfg.autoencoder.space_to_depth, cfg.model
    latent = (m.in_channels, cfg.data.frames, cfg.data.height // s2d, cfg.data.width // s2d)
    return math.prod(patch_grid(m, latent))


def analytic(mesh: Mesh) -> dict[str, list[tuple[str, int]]]:
    """Bytes one rank sends in a train step: collective kind -> [(term, bytes)]."""
    from parallel.mesh import MeshDims
    from parallel.plan_comm import ElementSizes, step_comm_terms
    from trainer.build import build_meta_model

    cfg = compose(BASE + mesh.overrides)
    params = {name: (tuple(p.shape), p.requires_grad)  # shapes and requires_grad only
              for name, p in build_meta_model(cfg).named_parameters()}
    context = sum(enc.max_length for enc in cfg.text.encoders.values())
    terms: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for term in step_comm_terms(params, cfg.model, MeshDims(1, mesh.dp_shard, mesh.cp, mesh.tp),
                                mesh.cp_mode, cfg.recipe.batch_size // mesh.dp_shard,
                                token_count(cfg), context, ElementSizes(E, E)):
        terms[term.kind].append((f"{PHASES[term.phase]} {term.label}", term.nbytes))
    return terms


# ---------------------------------------------------------------- output

def table(rows: list[tuple[Mesh, dict, dict]]) -> str:
    lines = ["| mode | mesh | collective kind | measured B/rank | analytic B/rank | ratio "
             "| analytic terms |",
             "|---|---|---|---:|---:|---:|---|"]
    for mesh, sent, terms in rows:
        for kind in sorted(set(sent) | set(terms)):
            measured = sent.get(kind, 0)
            expected = sum(b for _, b in terms.get(kind, []))
            ratio = f"{measured / expected:.3f}" if expected else "-"
            parts = " + ".join(f"{label} {b:,}" for label, b in terms.get(kind, []) if b)
            lines.append(f"| {mesh.name} | {mesh.label} | {kind} | {measured:,} | {expected:,} "
                         f"| {ratio} | {parts} |")
    return "\n".join(lines)


def spec_table(rows: list[tuple[Mesh, dict, dict]]) -> str:
    """arXiv 2410.13720 §9's yardstick next to this model's per-rank, per-layer forward volume."""
    cfg = compose(BASE)
    h, b, depth = cfg.model.width, cfg.recipe.batch_size, cfg.model.depth
    sent = {(m.dp_shard, m.cp, m.tp, m.cp_mode): counted for m, counted, _ in rows}
    lines = ["| scheme | peers (per link, per layer) | here: per rank, per layer, forward "
             "| P | N = B·L | analytic elements | measured elements |",
             "|---|---|---|---:|---:|---:|---:|"]
    # Ulysses: q, k, v to head shards and the output back, (P-1)/P of each leaves; the
    # backward mirrors it. TP/SP: 3 sublayers (self-attn, cross-attn, FFN), each an
    # all-gather in and a reduce-scatter out; the step's reduce-scatters (3 forward, 3
    # backward mirrors of the all-gathers) add up to one forward's all-gathers + RS.
    cases = [("Ulysses (CP)", "4·N·h/P", "4·(P-1)/P · N·h/P", p, (1, p, 1, "ulysses"),
              "all_to_all", 2) for p in (2, 4)]
    cases.append(("TP/SP (Megatron-SP)", "4·N·h", "6·(P-1)/P · N·h", 2,
                  (1, 1, 2, "allgather_kv"), "reduce_scatter", 1))
    for label, spec, formula, p, key, kind, passes in cases:
        n = b * -(-token_count(cfg) // p) * p  # tokens padded to a multiple of P
        per_p = 4 * (p - 1) * n * h // p // p if kind == "all_to_all" else 6 * (p - 1) * n * h // p
        got = sent.get(key, {}).get(kind)
        shown = f"{got // (passes * depth * E):,}" if got is not None else "-"
        lines.append(f"| {label} | {spec} | {formula} | {p} | {n} | {per_p:,} | {shown} |")
    return "\n".join(lines) + (
        "\n\nMegatron's layer has 2 sublayers (4·(P-1)/P·N·h); our block adds cross-attention. "
        "Ulysses' volume per rank falls with P, TP/SP's does not. Measured = the step's "
        "all-to-all bytes / 2 passes / depth / 4 B (Ulysses), reduce-scatter bytes / depth / "
        "4 B (TP/SP).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three 2-rank meshes only")
    args = parser.parse_args()
    from tests.distributed import run_distributed

    began = time.perf_counter()
    rows = []
    for mesh in QUICK if args.quick else MESHES:
        print(f"{mesh.name} ({mesh.label}) ...", file=sys.stderr, flush=True)
        ranks = run_distributed(measure, mesh.world, mesh)
        if any(r != ranks[0] for r in ranks):
            print(f"warning: {mesh.name}: ranks sent different volumes: {ranks}",
                  file=sys.stderr)
        rows.append((mesh, ranks[0], analytic(mesh)))
    print(f"torch {torch.__version__}, gloo, fp32; DiT width 32, depth 2, 4 heads, ffn 48; "
          "27 video tokens, 16 text tokens, global batch 2; rank 0 shown (all ranks equal "
          "unless warned)\n")
    print(table(rows) + "\n")
    print(spec_table(rows))
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
