"""``python -m parallel.plan model=dit_30b tokens=73728 gpus=256 [gpu=h100|h200|a100] [top=10]``

The analytic sharding planner. Movie Gen (arXiv 2410.13720, model parallelism) ranked its
parallelism plans analytically; this does the same for this repo's code. Every mesh
dp_replicate x dp_shard x cp x tp = gpus (tp dividing the heads), every context-parallel
mode, activation recompute off and on, for a fixed global batch, gets:
  - per-GPU memory: fp32 params, grads, AdamW m and v, EMA (``plan_memory.state_bytes``),
    FSDP2's gathered units and gradient buffers, and the activations of the model's own
    width, depth, ffn, heads, sequence / cp and tp (``plan_memory.activation_bytes``);
  - bytes per collective per step (``plan_comm.step_comm_terms``, the formulas the comm
    bench checks against the collectives);
  - compute time at the GPU's dense bf16 peak (``models.costs``), exposed communication
    under the overlap assumptions printed with the table, predicted step time and MFU.
Plans are ranked by step time; those that do not fit in memory are marked.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from models.costs import dit_forward_flops, dit_train_flops
from models.dit import DiT, DiTConfig
from parallel.context_parallel import MODES
from parallel.mesh import MeshDims
from parallel.plan_comm import CommTerm, ElementSizes, ParamShapes, step_comm_terms
from parallel.plan_memory import (
    ActivationShape,
    activation_bytes,
    fsdp_buffer_bytes,
    state_bytes,
)

GB = 1e9
# Movie Gen's text: UL2 128 + ByT5 256 + MetaCLIP 77 tokens (conf/text/movie_gen.yaml)
MOVIE_GEN_CONTEXT = 461
# Movie Gen's 768 px stage: a global batch of 1,536 clips on 6,144 GPUs
SAMPLES_PER_GPU = 1536 / 6144


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense bf16 peak
    hbm_gb: float
    nvlink_gb_s: float  # per GPU per direction, inside a node
    ib_gb_s: float      # per GPU, between nodes


GPUS = {"h100": GPU("H100 SXM", 989.0, 80.0, 450.0, 50.0),
        "h200": GPU("H200 SXM", 989.0, 141.0, 450.0, 50.0),
        # NVLink 3 (600 GB/s both ways) and one 200 Gb/s HDR port per GPU
        "a100": GPU("A100 SXM 80GB", 312.0, 80.0, 300.0, 25.0)}


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3g}"


def _s(seconds: float) -> str:
    return f"{seconds:.4g}"


@dataclass
class PlanConfig:
    """The planner's settings (conf/plan.yaml); ``model`` is a conf/model option."""

    model: DiTConfig = field(default_factory=DiTConfig)
    tokens: int | None = None  # video tokens per sample; null: the model's full patch grid
    context_tokens: int = MOVIE_GEN_CONTEXT
    gpus: int = 256
    gpu: str = "h100"
    batch: int | None = None  # global batch in samples; null: gpus / 4 (Movie Gen's ratio)
    param_dtype: str = "bf16"  # FSDP2 compute dtype: bf16 | fp32 (storage is always fp32)
    gpus_per_node: int = 8
    memory_fraction: float = 0.9  # of HBM usable by tensors (CUDA context, NCCL, fragments)
    top: int = 10

    def __post_init__(self) -> None:
        for name in ("gpus", "context_tokens", "gpus_per_node", "top"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.gpu not in GPUS:
            raise ValueError(f"gpu={self.gpu!r} is not one of {', '.join(GPUS)}")
        if self.param_dtype not in ("bf16", "fp32"):
            raise ValueError(f"param_dtype={self.param_dtype!r} must be bf16 or fp32")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction={self.memory_fraction} must be in (0, 1]")
        grid = model_tokens(self.model)
        if self.tokens is None:
            self.tokens = grid
        elif not 1 <= self.tokens <= grid:
            raise ValueError(f"tokens={self.tokens} must be in [1, {grid:,}], the model's "
                             f"position tables ({self.model.max_patches_t} x "
                             f"{self.model.max_patches_h} x {self.model.max_patches_w} patches)")
        if self.batch is None:
            self.batch = max(1, round(self.gpus * SAMPLES_PER_GPU))
        elif self.batch < 1:
            raise ValueError(f"batch={self.batch} must be >= 1 (global samples per step)")


def model_tokens(model: DiTConfig) -> int:
    """The model's own sequence: its full patch grid (dit_30b: 32 x 48 x 48 = 73,728)."""
    return model.max_patches_t * model.max_patches_h * model.max_patches_w


def model_latent_shape(model: DiTConfig) -> tuple[int, int, int, int]:
    """The latent (C, T, H, W) of the model's own sequence, in its own latent channels."""
    return (model.in_channels, model.max_patches_t * model.patch_t,
            model.max_patches_h * model.patch_h, model.max_patches_w * model.patch_w)


def dit_parameter_shapes(model: DiTConfig) -> ParamShapes:
    """The DiT's parameters as ``plan_comm`` names them, built on meta (no memory)."""
    with torch.device("meta"):
        dit = DiT(model)
    return {f"dit.{name}": (tuple(p.shape), p.requires_grad)
            for name, p in dit.named_parameters()}


@dataclass(frozen=True)
class Candidate:
    dims: MeshDims
    cp_mode: str  # allgather_kv | ulysses | ring; meaningless at cp = 1
    recompute: bool

    @property
    def mode_label(self) -> str:
        return self.cp_mode if self.dims.cp > 1 else "-"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model: DiTConfig, gpus: int, batch: int) -> tuple[list[Candidate], Counter]:
    """Every mesh of ``gpus`` with tp dividing the heads and a whole number of samples per
    data-parallel rank; and how many meshes were skipped for which reason."""
    found, skipped = [], Counter()
    for tp in divisors(gpus):
        for cp in divisors(gpus // tp):
            for dp_shard in divisors(gpus // (tp * cp)):
                dims = MeshDims(gpus // (tp * cp * dp_shard), dp_shard, cp, tp)
                if model.heads % tp:
                    skipped[f"heads {model.heads} not divisible by tp"] += 1
                    continue
                if batch % dims.dp:
                    skipped[f"global batch {batch} not divisible by dp"] += 1
                    continue
                modes = [m for m in MODES if m != "ulysses" or (model.heads // tp) % cp == 0]
                for mode in modes if cp > 1 else MODES[:1]:
                    found += [Candidate(dims, mode, recompute) for recompute in (False, True)]
    return found, skipped


def group_span(group: str, dims: MeshDims) -> int:
    """Consecutive ranks a process group spans (tp innermost, then cp, dp_shard,
    dp_replicate): the group stays inside a node when this fits in one."""
    world = dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp
    return {"tp": dims.tp, "cp": dims.cp * dims.tp, "fsdp": dims.dp_shard * dims.cp * dims.tp
            }.get(group, world)


@dataclass(frozen=True)
class Prediction:
    candidate: Candidate
    samples: int                 # per data-parallel rank per step
    memory: dict[str, float]     # bytes per GPU by part
    comm: list[CommTerm]
    compute_s: float
    exposed_s: dict[str, float]  # fsdp | tp | cp | other
    step_s: float
    mfu: float
    fits: bool

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())


@dataclass(frozen=True)
class Setup:
    """What every candidate shares: model, its parameters, shape, GPU, budget."""

    cfg: PlanConfig
    params: ParamShapes

    @property
    def gpu(self) -> GPU:
        return GPUS[self.cfg.gpu]

    @property
    def sizes(self) -> ElementSizes:
        return ElementSizes(compute=2 if self.cfg.param_dtype == "bf16" else 4, reduce=4)

    def bandwidth(self, group: str, dims: MeshDims) -> float:
        inside = group_span(group, dims) <= self.cfg.gpus_per_node
        return (self.gpu.nvlink_gb_s if inside else self.gpu.ib_gb_s) * GB


def exposed_seconds(setup: Setup, c: Candidate, terms: list[CommTerm], compute_s: float,
                    attention_s: float) -> dict[str, float]:
    """Communication on the critical path, by group (the assumptions in ``ASSUMPTIONS``)."""
    model = setup.cfg.model
    seconds = [(t, t.nbytes / setup.bandwidth(t.group, c.dims)) for t in terms]
    fsdp = [(t, s) for t, s in seconds if t.overlaps == "fsdp"]
    fsdp_total = sum(s for _, s in fsdp)
    # the first unit's forward gather and the last unit's gradient reduction wait; the
    # rest hides behind compute as long as compute lasts
    units = model.depth + 1
    first_last = sum(s for t, s in fsdp if t.phase == "forward" or t.kind != "all_gather")
    exposed_fsdp = first_last / units
    exposed_fsdp += max(0.0, fsdp_total - exposed_fsdp - compute_s)
    ring = sum(s for t, s in seconds if t.overlaps == "attention")
    exposed = {"fsdp": exposed_fsdp, "tp": 0.0, "cp": max(0.0, ring - attention_s), "other": 0.0}
    for t, s in seconds:
        if not t.overlaps:
            exposed[t.group if t.group in ("tp", "cp") else "other"] += s
    return exposed


def evaluate(setup: Setup, c: Candidate) -> Prediction:
    """Memory, communication and time of one candidate, per GPU and step."""
    cfg, dims = setup.cfg, c.dims
    m, tokens, context = cfg.model, cfg.tokens, cfg.context_tokens
    samples = cfg.batch // dims.dp
    sizes = setup.sizes
    memory = {part: float(b) for part, b in state_bytes(setup.params, dims).items()}
    memory["comm buffers"] = float(sum(fsdp_buffer_bytes(setup.params, dims,
                                                         sizes.compute).values()))
    shape = ActivationShape(samples, tokens, context, dims.tp, dims.cp, c.cp_mode, sizes.compute)
    memory["activations"] = float(activation_bytes(m, shape, c.recompute)["peak"])
    terms = step_comm_terms(setup.params, m, dims, c.cp_mode, samples, tokens, context,
                            sizes, c.recompute)
    shards = dims.tp * dims.cp  # each rank computes 1/(tp cp) of its samples' FLOPs
    model_flops = dit_train_flops(m, tokens, context, samples) / shards
    passes = 4 if c.recompute else 3  # forward, backward (2x), recomputed forward
    flops = model_flops + (dit_forward_flops(m, tokens, context, samples) / shards
                           if c.recompute else 0)
    peak = setup.gpu.bf16_tflops * 1e12
    # scores and weighted sum of self-attention, forward 4 L^2 D per layer and sample
    attention_flops = passes * m.depth * 4 * samples * tokens * tokens * m.width / shards
    # SDPA and the ring's per-block fused kernels (flash) all run at the bf16 peak
    attention_s = attention_flops / peak
    compute_s = (flops - attention_flops) / peak + attention_s
    exposed = exposed_seconds(setup, c, terms, compute_s, attention_s)
    step_s = compute_s + sum(exposed.values())
    fits = sum(memory.values()) <= cfg.memory_fraction * setup.gpu.hbm_gb * GB
    return Prediction(c, samples, memory, terms, compute_s, exposed, step_s,
                      model_flops / (step_s * peak), fits)


def layouts(predictions: list[Prediction]) -> list[Prediction]:
    """The first (fastest) prediction of each layout: tp, cp, cp mode and recompute; the
    dp_replicate x dp_shard split under it only moves the FSDP traffic, mostly hidden."""
    seen, kept = set(), []
    for p in predictions:
        c = p.candidate
        key = (c.dims.tp, c.dims.cp, c.mode_label, c.recompute)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def is_movie_gen(c: Candidate) -> bool:
    """conf/parallel/movie_gen.yaml: tp 4, cp 2 all-gather K/V, FSDP over the rest, every
    block recomputed."""
    return (c.dims.tp, c.dims.cp, c.cp_mode, c.recompute, c.dims.dp_replicate) == (
        4, 2, "allgather_kv", True, 1)


def plan(cfg: PlanConfig, setup: Setup | None = None) -> tuple[list[Prediction], Counter]:
    """Every candidate's prediction, fastest first; and the skipped meshes by reason."""
    setup = setup or Setup(cfg, dit_parameter_shapes(cfg.model))
    found, skipped = candidates(cfg.model, cfg.gpus, cfg.batch)
    predictions = [evaluate(setup, c) for c in found]
    # equal times to 4 digits (plans differing where nothing is exposed): smaller footprint
    return sorted(predictions, key=lambda p: (float(_s(p.step_s)), p.total_memory)), skipped


ASSUMPTIONS = """\
Assumptions: compute at the dense bf16 peak (a lower bound on time; MFU counts the 3 x
forward model FLOPs, not the recompute), ring attention's fused kernels included. NVLink
inside a node of {node} GPUs, IB between nodes (a group spanning nodes runs at
the IB rate); bytes are what one rank sends (bandwidth-optimal rings, as
parallel.comm_counter measures), timed by bandwidth alone (no per-message latency).
Overlap: FSDP2's gathers and reductions run beside compute, except the first unit's forward
gather and the last unit's gradient reduction (and whatever exceeds the compute time); TP's
all-gathers and reduce-scatters, allgather_kv's K/V gather and Ulysses' all-to-alls are
exposed (the next matmul or the attention kernel waits for them: no async TP here); ring
attention's hops hide behind its attention compute. Memory: fp32 params (the master;
param_dtype only sets the gathered copy), fp32 grads, AdamW m and v, EMA, all sharded;
FSDP2's gathered units and gradient buffers; activations of this repo's eager kernels
(norms saved in fp32, flash attention saving q, k, v, out); a plan fits if its total is
<= {frac:.0%} of HBM. DiT only: the frozen text encoders and text projections are left out."""


def comm_gb(p: Prediction, groups: tuple[str, ...]) -> float:
    return sum(t.nbytes for t in p.comm if t.group in groups) / GB


def table(predictions: list[Prediction]) -> list[str]:
    lines = ["| # | dp_rep | dp_shard | cp | cp_mode | tp | recompute | samples/rank "
             "| state GB | buffers GB | act GB | total GB | fits | FSDP GB | TP GB | CP GB "
             "| compute s | exposed s | step s | MFU |",
             "|" + "---:|" * 6 + "---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
             "---:|---:|"]
    for rank, p in enumerate(predictions, 1):
        c, mem = p.candidate, p.memory
        state = sum(mem[k] for k in ("params", "grads", "optimizer", "ema"))
        lines.append(
            f"| {rank} | {c.dims.dp_replicate} | {c.dims.dp_shard} | {c.dims.cp} "
            f"| {c.mode_label} | {c.dims.tp} | {'on' if c.recompute else 'off'} | {p.samples} "
            f"| {_gb(state)} | {_gb(mem['comm buffers'])} | {_gb(mem['activations'])} "
            f"| {_gb(p.total_memory)} | {'yes' if p.fits else '**OOM**'} "
            f"| {comm_gb(p, ('fsdp', 'replicate')):.3g} | {comm_gb(p, ('tp',)):.3g} "
            f"| {comm_gb(p, ('cp',)):.3g} | {_s(p.compute_s)} | {_s(sum(p.exposed_s.values()))} "
            f"| {_s(p.step_s)} | {p.mfu:.1%} |")
    return lines


def breakdown(setup: Setup, p: Prediction) -> list[str]:
    """The best plan in detail: memory by part and every collective term."""
    c = p.candidate
    lines = [f"Plan 1 in detail (dp_replicate {c.dims.dp_replicate} x dp_shard "
             f"{c.dims.dp_shard} x cp {c.dims.cp} ({c.mode_label}) x tp {c.dims.tp}, "
             f"recompute {'on' if c.recompute else 'off'}), per GPU:",
             "  memory: " + ", ".join(f"{k} {_gb(v)} GB" for k, v in p.memory.items())
             + f"; total {_gb(p.total_memory)} GB",
             "  exposed communication: " + ", ".join(f"{k} {_s(v)} s"
                                                     for k, v in p.exposed_s.items()),
             "  bytes sent per step:"]
    for t in p.comm:
        gb_s = setup.bandwidth(t.group, c.dims) / GB
        lines.append(f"    {t.group:9s} {t.kind:14s} {t.phase:8s} {t.label:32s} "
                     f"{t.nbytes / GB:10.3f} GB  @ {gb_s:.0f} GB/s")
    return lines


def report(cfg: PlanConfig) -> str:
    """The printed ranking."""
    setup = Setup(cfg, dit_parameter_shapes(cfg.model))
    predictions, skipped = plan(cfg, setup)
    gpu, m = setup.gpu, cfg.model
    count = sum(math.prod(shape) for shape, trainable in setup.params.values() if trainable)
    fitting = [p for p in predictions if p.fits]
    lines = [f"DiT {m.depth} layers / width {m.width} / FFN {m.ffn_dim} / {m.heads} heads, "
             f"{count / 1e9:.2f}B parameters; {cfg.tokens:,} video tokens per sample "
             f"(latent {model_latent_shape(m) if cfg.tokens == model_tokens(m) else 'custom'}, "
             f"{m.in_channels} channels) + {cfg.context_tokens} text tokens; global batch "
             f"{cfg.batch} samples; {cfg.gpus} x {gpu.name} ({gpu.bf16_tflops:.0f} TFLOP/s "
             f"dense bf16, {gpu.hbm_gb:.0f} GB HBM, NVLink {gpu.nvlink_gb_s:.0f} GB/s, IB "
             f"{gpu.ib_gb_s:.0f} GB/s per GPU); compute dtype {cfg.param_dtype}.",
             ASSUMPTIONS.format(node=cfg.gpus_per_node, frac=cfg.memory_fraction), "",
             f"{len(predictions)} plans, {len(fitting)} fit in memory"
             + "".join(f"; {n} meshes skipped: {why}" for why, n in skipped.items()) + ".", ""]
    best = layouts(fitting)
    if best:
        lines += [f"Fastest {min(cfg.top, len(best))} layouts that fit (each with its fastest "
                  f"dp_replicate x dp_shard split):", *table(best[:cfg.top]), ""]
    faster_oom = [p for p in layouts([p for p in predictions if not p.fits])
                  if not best or p.step_s < best[0].step_s][:3]
    if faster_oom:
        lines += ["Faster layouts that do not fit:", *table(faster_oom), ""]
    for p in (p for p in predictions if is_movie_gen(p.candidate)):
        rank = 1 + sum(other.step_s < p.step_s for other in best)
        lines += [f"Movie Gen's layout (conf/parallel/movie_gen.yaml: tp 4, cp 2 allgather_kv, "
                  f"FSDP over the rest, recompute): {_gb(p.total_memory)} GB "
                  f"({'fits' if p.fits else 'does not fit'}), step {_s(p.step_s)} s, MFU "
                  f"{p.mfu:.1%}; layout {rank} of {len(best)} by step time.", ""]
    if best:
        lines += breakdown(setup, best[0])
    return "\n".join(lines)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="plan_schema", node=PlanConfig)
    cs.store(group="model", name="dit_schema", node=DiTConfig)


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    try:
        print(report(OmegaConf.to_object(cfg)))
    except ValueError as error:
        raise SystemExit(f"config error: {str(error).splitlines()[0]}") from None


if __name__ == "__main__":
    main()
