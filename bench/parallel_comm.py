"""Bytes each rank sends in one training step, per parallelism, measured against formulas.

For each mesh, gloo processes run the real ``trainer.train.train_step`` (forward, loss,
backward, grad-norm clipping, AdamW, EMA) of a tiny text-to-video DiT built by
``trainer.build.build_model`` (so TP/SP, CP attention and FSDP2 are the product's) under
``parallel.comm_counter.CommCounter``, which also sees the collectives DTensor issues inside
its own op dispatch (implicit redistributions). Next to the measurement: the bytes derived
from the plans (``analytic``), term by term, and their ratio.

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
from fnmatch import fnmatch
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._mesh import TINY_TEXT, compose, start, video_batch  # noqa: E402
from parallel.comm_counter import CommCounter  # noqa: E402
from parallel.context_parallel import cp_attention_comm_bytes  # noqa: E402

BASE = ["model.width=32", "model.depth=2", "model.heads=4", "model.ffn_dim=48",
        "data.frames=3", "data.height=12", "data.width=12", "recipe.batch_size=2", *TINY_TEXT]
CAPTIONS = ["a red square moving left", "a blue circle"]
E = 4  # fp32 bytes per element: parameters, activations and gradients
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
    def fsdp(self) -> bool:  # parallel.fsdp.needs_fsdp
        return self.dp_shard * self.cp > 1

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
    from trainer.train import NonFiniteGuard, train_step

    cfg = compose(BASE + mesh.overrides)
    ctx, model = start(cfg, mesh.world)
    engine = NativeEngine(model, lambda params: build_optimizer(params, cfg.recipe, 10))
    ema, guard = EMA(engine.ema_tensors(), cfg.recipe.ema_decay), NonFiniteGuard(3)
    task = TextToVideoTask(cfg, ctx)
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    batch = {"video": video_batch(cfg)[rows], "caption": CAPTIONS[rows]}
    with CommCounter() as counter:
        train_step(cfg, 1, batch, engine, task, ema, guard, ctx)
    return dict(counter.sent)


# ---------------------------------------------------------------- the formulas

def all_reduce(nbytes: int, n: int) -> int:
    """Sent by one rank in a ring all-reduce (reduce-scatter + all-gather)."""
    return 2 * nbytes * (n - 1) // n


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """A parameter's shape on one tp rank under ``tensor_parallel.block_plan``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from parallel.tensor_parallel import block_plan

    parts = name.split(".")
    style = block_plan().get(".".join(parts[3:-1])) if parts[1] == "blocks" else None
    if isinstance(style, ColwiseParallel):
        return (shape[0] // tp, *shape[1:])
    if isinstance(style, RowwiseParallel):
        return (shape[0], shape[1] // tp)
    return shape


def fsdp_unit(name: str, trainable: bool) -> str:
    """parallel.fsdp units: each DiT block, each frozen text encoder, the rest of the DiT,
    the rest of the text conditioner."""
    parts = name.split(".")
    if parts[1] == "blocks" or (parts[:2] == ["text", "encoders"] and not trainable):
        return ".".join(parts[:3])
    return parts[0]


def token_count(cfg) -> int:
    """Video tokens of one sample: pixels folded by the identity autoencoder, then patches."""
    from models.dit import patch_grid

    s2d, m = cfg.autoencoder.space_to_depth, cfg.model
    latent = (m.in_channels, cfg.data.frames, cfg.data.height // s2d, cfg.data.width // s2d)
    return math.prod(patch_grid(m, latent))


def analytic(mesh: Mesh) -> dict[str, list[tuple[str, int]]]:
    """Bytes one rank sends in a train step: collective kind -> [(term, bytes)]."""
    from trainer.build import build_meta_model

    cfg = compose(BASE + mesh.overrides)
    m, tp, cp = cfg.model, mesh.tp, mesh.cp
    model = build_meta_model(cfg)  # shapes and requires_grad only
    params = {name: (tp_local_shape(name, tuple(p.shape), tp), p.requires_grad)
              for name, p in model.named_parameters()}
    tokens = token_count(cfg)
    batch, depth, width = cfg.recipe.batch_size // mesh.dp_shard, m.depth, m.width
    out_dim = m.patch_volume * m.in_channels
    context = sum(enc.max_length for enc in cfg.text.encoders.values())
    local = -(-tokens // cp)  # CP shard, padding included
    seq = -(-local // tp)  # DTensor's Shard(1) chunk of it (uneven shards are padded)
    terms: dict[str, list[tuple[str, int]]] = defaultdict(list)

    if tp > 1:
        chunk = batch * seq * width * E * (tp - 1)  # one sublayer all-gather / reduce-scatter
        partial = [math.prod(shape) * E for name, (shape, _) in params.items()
                   if any(fnmatch(name, pattern) for pattern in PARTIAL_GRADS)]
        terms["all_gather"] += [("fwd 3 sublayer inputs/block", 3 * depth * chunk),
                                ("fwd final output", batch * seq * out_dim * E * (tp - 1)),
                                ("bwd mirror of the reduce-scatters", 3 * depth * chunk),
                                ("bwd position grad", seq * width * E * (tp - 1))]
        terms["reduce_scatter"] += [("fwd 3 sublayer outputs/block", 3 * depth * chunk),
                                    ("bwd mirror of the all-gathers", 3 * depth * chunk)]
        terms["all_reduce"] += [
            ("bwd text context grad/block", depth * all_reduce(batch * context * width * E, tp)),
            ("bwd time-path SiLU grads", 2 * all_reduce(batch * width * E, tp)),
            # One all-reduce per Partial grad, to the parameter's placement: FSDP2 does it
            # before its reduce-scatter; without FSDP, NativeEngine.settle_partial_grads.
            ("bwd Partial grads (FSDP2)" if mesh.fsdp else "opt settle Partial grads",
             sum(all_reduce(nbytes, tp) for nbytes in partial))]

    if cp > 1:
        per_layer = cp_attention_comm_bytes(mesh.cp_mode, batch, m.heads // tp, local * cp,
                                            width // m.heads, cp, E)
        forward_kind, backward_kind = CP_KINDS[mesh.cp_mode]
        terms[forward_kind].append(("fwd self-attention", depth * per_layer["forward"]))
        terms[backward_kind].append(("bwd self-attention", depth * per_layer["backward"]))
        terms["all_gather"].append(("fwd output gather", batch * local * out_dim * E * (cp - 1)))

    if mesh.fsdp:
        n = mesh.dp_shard * cp
        gathered, reduced = defaultdict(int), defaultdict(int)
        for name, (shape, trainable) in params.items():
            unit = fsdp_unit(name, trainable)
            shard = -(-shape[0] // n) * math.prod(shape[1:]) * E  # dim 0 padded to n chunks
            gathered[unit] += shard
            reduced[unit] += shard if trainable else 0
        # Units without a trainable parameter: the frozen text encoders, in forward order.
        frozen = [unit for unit in gathered if not reduced[unit]]
        # reshard_after_forward: every trainable unit is gathered again for its backward; a
        # frozen encoder runs under no_grad and is marked not to unshard in backward, so
        # FSDP2's backward prefetch skips it too.
        twice = sum(b for unit, b in gathered.items() if unit not in frozen)
        terms["all_gather"] += [
            (f"fwd+bwd FSDP params ({len(gathered) - len(frozen)} units ×2)", 2 * twice * (n - 1)),
            ("fwd frozen text encoder", sum(gathered[unit] for unit in frozen) * (n - 1))]
        terms["reduce_scatter"] += [("bwd FSDP grads", sum(reduced.values()) * (n - 1))]

    # Grad norm (parallel.engine.total_grad_norm): per device mesh, one all-reduce of the
    # stacked per-parameter norms for each mesh dim that shards the grads.
    trainable = [name for name, (_, grad) in params.items() if grad]
    dit = sum(name.startswith("dit.") for name in trainable)
    norms = []
    if mesh.fsdp:
        n = mesh.dp_shard * cp
        norms += [all_reduce(dit * E, n), all_reduce((len(trainable) - dit) * E, n)] \
            if tp > 1 else [all_reduce(len(trainable) * E, n)]
    if tp > 1:
        norms.append(all_reduce(dit * E, tp))
    terms["all_reduce"].append(("opt grad-norm partials", sum(norms)))
    if mesh.dp_shard > 1:  # ctx.mean_over_dp(loss)
        terms["all_reduce"].append(("loss mean over dp", all_reduce(E, mesh.dp_shard)))
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
