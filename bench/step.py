"""Training-step throughput of the DiT on this machine, against its own matmul peak and a peer.

What it measures, in one run:
1. The dense matmul peak of the machine: ``torch.mm`` of large square matrices, best of N,
   FLOP/s = 2n^3/t, for fp32 and bf16, at the start and again at the end of the run (the
   best of both is the denominator of every ratio: a shared 2-core VM drifts).
2. For a few (width, depth, video tokens) points, one training step of ``models.dit.DiT``:
   forward + MSE loss + backward, no optimizer (AdamW is O(params) and would only add a
   constant that has nothing to do with matmul throughput), batch 1, 64 text tokens, in
   fp32 and in bf16 autocast.
3. The same step of diffusers' ``WanTransformer3DModel`` configured to the same width,
   depth, heads, ffn_dim, patch (1, 2, 2), 16 latent channels and text length, timed
   interleaved with ours (ours, peer, peer, ours, ...) so machine noise hits both; the
   best of the repetitions is reported.

FLOPs are counted, not estimated: one fwd+bwd of each model runs under
``torch.utils.flop_counter.FlopCounterMode`` (this is also the warm-up step, never timed).
Our closed form ``3 * models.costs.dit_forward_flops`` is printed beside the count.

Before the run and before every case the script waits (up to 15 min in all) while another
process keeps a core busy (a training run, pytest, another bench), so timings are clean.

Run from the repository root (diffusers is the optional ``[bench]`` extra; without it the
peer rows are left out):
    python bench/step.py            # the full table, ~7-8 minutes on 2 cores
    python bench/step.py --quick    # a tiny subset, under a minute
Progress goes to stderr, the markdown tables to stdout.

``--device cuda`` runs the scale plan instead (``--plan scale``; the table plan runs on a GPU
too when asked for): our DiT at conf/model/dit_1b.yaml's width, heads, FFN and depth, bf16
autocast, at 256 px (the 16-channel latent (32, 32, 32): 256 frames and 256 px over the
TAE's 8x compression in T, H and W, conf/autoencoder/tae_movie_gen.yaml; 8,192 tokens of
1x2x2 patches), then at twice the latent frames, and twice again, until a step runs out of
GPU memory (``torch.cuda.OutOfMemoryError``), passes ``--max-tokens`` or takes longer than
``--max-step-s``; the last point that fit is the longest sequence. Steps are timed by CUDA
events after a synchronize; peak memory is ``torch.cuda.max_memory_allocated`` of the step
(weights included); MFU is against the GPU's dense bf16 peak in ``parallel.plan.GPUS``,
matched on ``torch.cuda.get_device_name`` (``--peak-tflops`` for a GPU not in it). On the
CPU the scale plan takes the measured matmul peak of its dtype as the denominator:
    python bench/step.py --device cuda                     # dit_1b, ~1-2 minutes on an H100
    python bench/step.py --plan scale --width 64 --heads 2 --ffn-dim 128 --depth 1 \
        --latent 2 8 8 --max-tokens 128 --dtype fp32        # the same logic on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script: make `models` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quiet import wait_for_quiet  # noqa: E402
from models.costs import dit_forward_flops  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402

CHANNELS = 16  # latent channels of the TAE (arXiv 2410.13720 §3)
CONTEXT = 64  # text tokens
HEAD_DIM = 64
PEER = "Wan (diffusers)"
REPO = Path(__file__).resolve().parents[1]
# 256 frames at 256 px over the TAE's 8x in T, H and W: 32 x 16 x 16 = 8,192 tokens
LATENT_256PX = (32, 32, 32)


@dataclass(frozen=True)
class Case:
    """One benchmark point: a model size and a 16-channel latent (T, H, W), patches 1x2x2."""

    width: int
    depth: int
    latent: tuple[int, int, int]
    dtype: str  # "fp32" or "bf16" (autocast)
    num_heads: int | None = None  # default width / HEAD_DIM
    ffn: int | None = None  # default 4 * width

    @property
    def heads(self) -> int:
        return self.num_heads or self.width // HEAD_DIM

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.width

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        return t * (h // 2) * (w // 2)

    def dit_config(self) -> DiTConfig:
        # position tables grow with the scale plan's long latents (never below the defaults)
        t, h, w = self.latent
        return DiTConfig(width=self.width, depth=self.depth, heads=self.heads,
                         ffn_dim=self.ffn_dim, in_channels=CHANNELS,
                         max_patches_t=max(32, t), max_patches_h=max(48, h // 2),
                         max_patches_w=max(48, w // 2))


# Latents (T, H, W): (4, 32, 32) -> 1024 tokens, (8, 32, 32) -> 2048, (4, 64, 64) -> 4096,
# (16, 64, 64) -> 16384. Depth drops to 1 where a step would take tens of seconds; width
# 1024 at 16K tokens (~65 s a step, ~6 min with the peer) is left out.
FULL = [
    Case(256, 2, (4, 32, 32), "fp32"),
    Case(256, 2, (4, 64, 64), "fp32"),
    Case(256, 1, (16, 64, 64), "fp32"),
    Case(512, 2, (4, 32, 32), "fp32"),
    Case(512, 2, (8, 32, 32), "fp32"),
    Case(512, 2, (4, 64, 64), "fp32"),
    Case(512, 1, (16, 64, 64), "fp32"),
    Case(1024, 1, (4, 32, 32), "fp32"),
    Case(1024, 1, (4, 64, 64), "fp32"),
    # bf16: the backward's a @ b matmuls take torch's slow reference kernel on CPUs without
    # AVX512-BF16 (see the peak table), so a step is ~25x slower than fp32: one small point.
    Case(256, 2, (4, 32, 32), "bf16"),
]
QUICK = [Case(256, 1, (4, 32, 32), "fp32"), Case(256, 1, (4, 16, 16), "bf16")]


# ---------------------------------------------------------------- matmul peak

def elapsed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: wall clock on the CPU; on a GPU, CUDA events around the call
    after a synchronize (the queue is empty when it starts) and a synchronize after it."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1e3


def best_time(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    fn()  # warm-up: first call allocates and picks kernels
    return min(elapsed(fn, device) for _ in range(reps))


def matmul_rate(dtype: torch.dtype, n: int, layout: str, reps: int,
                device: torch.device) -> float:
    """FLOP/s of an n x n x n torch.mm; layout 'NN' is a @ b, 'NT' a @ b.T, 'TN' a.T @ b."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    x = a.t() if layout[0] == "T" else a
    y = b.t() if layout[1] == "T" else b
    return 2 * n**3 / best_time(lambda: torch.mm(x, y), reps, device)


def measure_peaks(quick: bool, device: torch.device) -> dict[tuple[str, str, int], float]:
    """FLOP/s keyed by (dtype, layout, n).

    fp32 is layout-blind (MKL). bf16 is not: without AVX512-BF16, a @ b (NN) goes to
    torch's reference gemm at ~1 GFLOP/s while a @ b.T and a.T @ b are 10-20x faster, so
    NN is shown at a small n only and the bf16 peak is the best layout at large n.
    """
    small, large = (512, 1024) if quick else (2048, 4096)
    plan = [("fp32", "NN", small, 10), ("fp32", "NN", large, 3 if quick else 4),
            ("bf16", "NN", small // 4, 1), ("bf16", "NT", small, 3), ("bf16", "TN", small, 3)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {(dt, layout, n): matmul_rate(dtypes[dt], n, layout, reps, device)
            for dt, layout, n, reps in plan}


def peak_of(dtype: str, runs: list[dict[tuple[str, str, int], float]]) -> float:
    """Best rate of ``dtype`` over all runs, leaving out bf16's slow small-n NN probe."""
    return max(rate for run in runs for (dt, layout, _), rate in run.items()
               if dt == dtype and not (dt == "bf16" and layout == "NN"))


# ---------------------------------------------------------------- models

Forward = Callable[..., torch.Tensor]


def build_ours(case: Case, device: torch.device) -> tuple[torch.nn.Module, Forward]:
    if device.type == "cpu":
        model = DiT(case.dit_config())
        model.init_weights()
    else:
        # init_weights draws from CPU generators tile by tile (~15 s for dit_1b); a step's
        # time does not depend on the values, so a GPU model gets N(0, 0.02) in place
        with device:
            model = DiT(case.dit_config())
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    randomise(model)
    return model, model  # forward(x, t, context, mask) is the module itself


def build_peer(case: Case, device: torch.device) -> tuple[torch.nn.Module, Forward] | None:
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:
        return None
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=case.heads, attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=case.width,
        ffn_dim=case.ffn_dim, num_layers=case.depth)
    randomise(model)
    model.to(device)

    def forward(x, t, context, mask):
        # Wan's blocks take no text mask (all 64 tokens are real here); its t is in [0, 1000].
        return model(x, 1000 * t, context, return_dict=False)[0]
    return model, forward


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Perturb every weight (as tests/test_dit.py does) so zero-init gates carry signal."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, ...]:
    """x, t, context, mask (our trainer always passes one), velocity target."""
    t, h, w = case.latent
    x = torch.randn(1, CHANNELS, t, h, w)
    context = torch.randn(1, CONTEXT, case.width)
    mask = torch.ones(1, CONTEXT, dtype=torch.bool)
    return tuple(v.to(device) for v in (x, torch.rand(1), context, mask, torch.randn_like(x)))


def train_step(model: torch.nn.Module, forward: Forward, inputs: tuple[torch.Tensor, ...],
               dtype: str) -> None:
    x, t, context, mask, target = inputs
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = forward(x, t, context, mask)
    loss = (out.float() - target).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- FLOP count

def attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of one SDPA call: 2 matmuls of 2*B*h*Lq*Lk*d FLOPs each."""
    b, h, lq, d = q_shape
    return 4 * b * h * lq * k_shape[2] * d


def attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None,
                             **kwargs) -> int:
    """dV, dP, dQ, dK: twice the forward. The kernel's recompute of QK^T is not counted
    (model FLOPs, the MFU convention of models/costs.py)."""
    return 2 * attention_flops(q_shape, k_shape, v_shape)


# FlopCounterMode has formulas for the CUDA SDPA kernels only; the CPU flash kernel that
# both models run here would otherwise count as 0 FLOPs.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        attention_backward_flops,
}


def counted_flops(step: Callable[[], None]) -> tuple[int, float]:
    """FLOPs of one step, and its (untimed-quality) wall time as a size hint."""
    start = time.perf_counter()
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops(), time.perf_counter() - start


# ---------------------------------------------------------------- one case

@dataclass
class Result:
    case: Case
    model: str
    flops: int
    analytic: int | None  # 3 x models.costs.dit_forward_flops, for ours only
    seconds: float  # best of reps
    reps: int
    peak_bytes: int | None = None  # torch.cuda.max_memory_allocated of the case (GPU only)


def run_case(case: Case, with_peer: bool, budget_s: float,
             device: torch.device) -> list[Result]:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs = make_inputs(case, device)
    builders = [("ours", build_ours)] + ([(PEER, build_peer)] if with_peer else [])
    models = [(name, built) for name, build in builders
              if (built := build(case, device)) is not None]
    steps = {name: (lambda m=m, f=f: train_step(m, f, inputs, case.dtype))
             for name, (m, f) in models}
    # The counted step doubles as the warm-up; its time sizes the repetitions so every
    # case costs about budget_s, with at least 3 and at most 8 timed steps per model.
    counted = {name: counted_flops(step) for name, step in steps.items()}
    pair_s = sum(seconds for _, seconds in counted.values())
    reps = max(3, min(8, int(budget_s / pair_s)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        # Interleaved, so a noisy moment hits both models; the order flips every rep
        # (ours, peer, peer, ours, ...) so neither always runs right after the other.
        order = list(steps.items()) if rep % 2 == 0 else list(reversed(steps.items()))
        for name, step in order:
            times[name].append(elapsed(step, device))
    analytic = 3 * dit_forward_flops(case.dit_config(), case.tokens, CONTEXT)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return [Result(case, name, counted[name][0], analytic if name == "ours" else None,
                   min(times[name]), reps, peak) for name in steps]


# ---------------------------------------------------------------- output

def peak_table(runs: list[dict[tuple[str, str, int], float]]) -> str:
    lines = ["| dtype | layout | n | GFLOP/s start | GFLOP/s end |", "|---|---|---:|---:|---:|"]
    for key in runs[0]:
        rates = " | ".join(f"{run[key] / 1e9:.1f}" for run in runs)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {rates} |")
    return "\n".join(lines)


def result_table(results: list[Result], peaks: dict[str, float]) -> str:
    lines = ["| dtype | width | depth | tokens | latent T,H,W | model | reps | step s | tokens/s "
             "| GFLOP counted | GFLOP 3x analytic | GFLOP/s | / mm peak |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c, rate = r.case, r.flops / r.seconds
        analytic = f"{r.analytic / 1e9:.1f}" if r.analytic is not None else "-"
        lines.append(
            f"| {c.dtype} | {c.width} | {c.depth} | {c.tokens} | {','.join(map(str, c.latent))} "
            f"| {r.model} | {r.reps} | {r.seconds:.3f} | {c.tokens / r.seconds:,.0f} "
            f"| {r.flops / 1e9:.1f} | {analytic} | {rate / 1e9:.1f} "
            f"| {rate / peaks[c.dtype]:.2f} |")
    return "\n".join(lines)


NOTES = f"""\
Step = forward + MSE loss + backward, no optimizer; batch 1, {CONTEXT} text tokens (our
DiT gets an all-True padding mask, as the trainer passes one; Wan takes none);
heads = width/{HEAD_DIM}, ffn_dim = 4*width. Our FFN is SwiGLU (3 matrices), Wan's a GELU MLP
(2 matrices) plus biases and q/k RMSNorm, so at equal ffn_dim Wan does fewer FLOPs:
compare GFLOP/s and the ratio, not step time. Time = best of `reps` interleaved steps.
GFLOP counted (FlopCounterMode, matmuls + attention; the flash backward's recompute of
QK^T not counted) is below 3x the closed form by the input gradients nobody needs: the
patch embedding's (the latent), the text K/V projections' (the context is an input here)
and the time MLP's first layer's."""


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (under a minute)")
    parser.add_argument("--no-peer", action="store_true", help="time our DiT only")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for other busy processes (trainer, pytest)")
    parser.add_argument("--only", default=None,
                        help="run the cases whose 'dtype/width/tokens' contains this string")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--plan", choices=("table", "scale"), default=None,
                        help="table: the CPU table above; scale: a model width at 256 px and "
                             "the longest sequence that fits (default: scale on cuda)")
    scale = parser.add_argument_group("scale plan")
    scale.add_argument("--model", default="conf/model/dit_1b.yaml",
                       help="width, depth, heads and ffn_dim from this conf/model file")
    for name in ("width", "depth", "heads", "ffn-dim"):
        scale.add_argument(f"--{name}", type=int, default=None, help="instead of --model's")
    scale.add_argument("--latent", type=int, nargs=3, default=list(LATENT_256PX),
                       metavar=("T", "H", "W"), help="the first point's 16-channel latent")
    scale.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    scale.add_argument("--max-tokens", type=int, default=131072)
    scale.add_argument("--max-step-s", type=float, default=10.0,
                       help="stop the search after a step this slow (the next is >= 2x)")
    scale.add_argument("--budget-s", type=float, default=3.0, help="timed seconds per point")
    scale.add_argument("--peak-tflops", type=float, default=None,
                       help="the GPU's dense bf16 peak, where parallel.plan.GPUS lacks it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA "
                         f"device")
    if (args.plan or ("scale" if device.type == "cuda" else "table")) == "scale":
        # imported here: bench.step_scale builds on this module's cases and timing
        from bench.step_scale import main_scale

        main_scale(args, device)
        return
    # Wan's q/k RMSNorm keeps an fp32 weight under bf16 autocast (torch warns): peer-only.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    cases = QUICK if args.quick else FULL
    if args.only:
        cases = [c for c in cases if args.only in f"{c.dtype}/{c.width}/{c.tokens}"]
    deadline = time.monotonic() + (0 if args.no_wait else 15 * 60)
    began = time.perf_counter()
    waited = wait_for_quiet(deadline)
    peak_runs = [measure_peaks(args.quick, device)]
    results: list[Result] = []
    for case in cases:
        # Checked before every case too: another job can start in the middle of the run.
        waited += wait_for_quiet(deadline)
        print(f"{case} ...", file=sys.stderr, flush=True)
        results += run_case(case, not args.no_peer, budget_s=3 if args.quick else 20,
                            device=device)
    waited += wait_for_quiet(deadline)
    peak_runs.append(measure_peaks(args.quick, device))
    peaks = {dt: peak_of(dt, peak_runs) for dt in ("fp32", "bf16")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print(peak_table(peak_runs))
    print("\nPeak used as denominator (GFLOP/s): "
          + ", ".join(f"{dt} {rate / 1e9:.1f}" for dt, rate in peaks.items()) + "\n")
    print(result_table(results, peaks) + "\n")
    print(NOTES)
    print(f"\nwall time {time.perf_counter() - began - waited:.0f} s (not counting waits)")


if __name__ == "__main__":
    main()
