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
"""

from __future__ import annotations

import argparse
import os
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

from models.costs import dit_forward_flops  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402

CHANNELS = 16  # latent channels of the TAE (arXiv 2410.13720 §3)
CONTEXT = 64  # text tokens
HEAD_DIM = 64
PEER = "Wan (diffusers)"


@dataclass(frozen=True)
class Case:
    """One benchmark point: a model size and a 16-channel latent (T, H, W), patches 1x2x2."""

    width: int
    depth: int
    latent: tuple[int, int, int]
    dtype: str  # "fp32" or "bf16" (autocast)

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @property
    def ffn_dim(self) -> int:
        return 4 * self.width

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        return t * (h // 2) * (w // 2)

    def dit_config(self) -> DiTConfig:
        return DiTConfig(width=self.width, depth=self.depth, heads=self.heads,
                         ffn_dim=self.ffn_dim, in_channels=CHANNELS)


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

def best_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: first call allocates and picks kernels
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(dtype: torch.dtype, n: int, layout: str, reps: int) -> float:
    """FLOP/s of an n x n x n torch.mm; layout 'NN' is a @ b, 'NT' a @ b.T, 'TN' a.T @ b."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    x = a.t() if layout[0] == "T" else a
    y = b.t() if layout[1] == "T" else b
    return 2 * n**3 / best_time(lambda: torch.mm(x, y), reps)


def measure_peaks(quick: bool) -> dict[tuple[str, str, int], float]:
    """FLOP/s keyed by (dtype, layout, n).

    fp32 is layout-blind (MKL). bf16 is not: without AVX512-BF16, a @ b (NN) goes to
    torch's reference gemm at ~1 GFLOP/s while a @ b.T and a.T @ b are 10-20x faster, so
    NN is shown at a small n only and the bf16 peak is the best layout at large n.
    """
    small, large = (512, 1024) if quick else (2048, 4096)
    plan = [("fp32", "NN", small, 10), ("fp32", "NN", large, 3 if quick else 4),
            ("bf16", "NN", small // 4, 1), ("bf16", "NT", small, 3), ("bf16", "TN", small, 3)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {(dt, layout, n): matmul_rate(dtypes[dt], n, layout, reps)
            for dt, layout, n, reps in plan}


def peak_of(dtype: str, runs: list[dict[tuple[str, str, int], float]]) -> float:
    """Best rate of ``dtype`` over all runs, leaving out bf16's slow small-n NN probe."""
    return max(rate for run in runs for (dt, layout, _), rate in run.items()
               if dt == dtype and not (dt == "bf16" and layout == "NN"))


# ---------------------------------------------------------------- models

Forward = Callable[..., torch.Tensor]


def build_ours(case: Case) -> tuple[torch.nn.Module, Forward]:
    model = DiT(case.dit_config())
    model.init_weights()
    randomise(model)
    return model, model  # forward(x, t, context, mask) is the module itself


def build_peer(case: Case) -> tuple[torch.nn.Module, Forward] | None:
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:
        return None
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=case.heads, attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=case.width,
        ffn_dim=case.ffn_dim, num_layers=case.depth)
    randomise(model)

    def forward(x, t, context, mask):
        # Wan's blocks take no text mask (all 64 tokens are real here); its t is in [0, 1000].
        return model(x, 1000 * t, context, return_dict=False)[0]
    return model, forward


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Perturb every weight (as tests/test_dit.py does) so zero-init gates carry signal."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """x, t, context, mask (our trainer always passes one), velocity target."""
    t, h, w = case.latent
    x = torch.randn(1, CHANNELS, t, h, w)
    context = torch.randn(1, CONTEXT, case.width)
    mask = torch.ones(1, CONTEXT, dtype=torch.bool)
    return x, torch.rand(1), context, mask, torch.randn_like(x)


def train_step(model: torch.nn.Module, forward: Forward, inputs: tuple[torch.Tensor, ...],
               dtype: str) -> None:
    x, t, context, mask, target = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
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


def run_case(case: Case, with_peer: bool, budget_s: float) -> list[Result]:
    torch.manual_seed(0)
    inputs = make_inputs(case)
    builders = [("ours", build_ours)] + ([(PEER, build_peer)] if with_peer else [])
    models = [(name, built) for name, build in builders if (built := build(case)) is not None]
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
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    analytic = 3 * dit_forward_flops(case.dit_config(), case.tokens, CONTEXT)
    return [Result(case, name, counted[name][0], analytic if name == "ours" else None,
                   min(times[name]), reps) for name in steps]


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


# ---------------------------------------------------------------- waiting for quiet

def cpu_ticks() -> dict[int, int]:
    """utime + stime (clock ticks) of every process, from /proc (empty where there is none)."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:  # the process ended while we looked
            continue
        ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return ticks


def busy_processes(window_s: float = 2.0, min_cores: float = 0.2) -> list[str]:
    """Other processes that used more than ``min_cores`` of CPU over a short window.

    Any such job (a training run, pytest, another bench) takes cores from us, so this
    looks at CPU use rather than at a list of names."""
    before = cpu_ticks()
    time.sleep(window_s)
    after = cpu_ticks()
    per_second = os.sysconf("SC_CLK_TCK") * window_s
    busy = []
    for pid, ticks in after.items():
        if pid != os.getpid() and (ticks - before.get(pid, ticks)) / per_second > min_cores:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            busy.append(f"{pid} {cmd[:80].strip()}")
    return busy


def wait_for_quiet(deadline: float, poll_s: float = 30) -> float:
    """Wait (until ``deadline``, a time.monotonic()) while another process uses the cores.

    Returns the seconds waited."""
    began = time.monotonic()
    while True:
        busy = busy_processes()
        if not busy or time.monotonic() > deadline:
            if busy:
                print(f"warning: still busy: {busy}; timings may be noisy", file=sys.stderr)
            return time.monotonic() - began
        print(f"waiting for {busy} to finish ...", file=sys.stderr, flush=True)
        time.sleep(poll_s)


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (under a minute)")
    parser.add_argument("--no-peer", action="store_true", help="time our DiT only")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for other busy processes (trainer, pytest)")
    parser.add_argument("--only", default=None,
                        help="run the cases whose 'dtype/width/tokens' contains this string")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Wan's q/k RMSNorm keeps an fp32 weight under bf16 autocast (torch warns): peer-only.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    cases = QUICK if args.quick else FULL
    if args.only:
        cases = [c for c in cases if args.only in f"{c.dtype}/{c.width}/{c.tokens}"]
    deadline = time.monotonic() + (0 if args.no_wait else 15 * 60)
    began = time.perf_counter()
    waited = wait_for_quiet(deadline)
    peak_runs = [measure_peaks(args.quick)]
    results: list[Result] = []
    for case in cases:
        # Checked before every case too: another job can start in the middle of the run.
        waited += wait_for_quiet(deadline)
        print(f"{case} ...", file=sys.stderr, flush=True)
        results += run_case(case, not args.no_peer, budget_s=3 if args.quick else 20)
    waited += wait_for_quiet(deadline)
    peak_runs.append(measure_peaks(args.quick))
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
