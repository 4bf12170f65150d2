"""Training-step throughput of the DiT on this machine, against its own matmul peak and a peer.

What it measures, in one run:
1. The dense matmul peak of the machine: ``torch.mm`` of large square matrices, best of N,
   FLOP/s = 2n^3/t, for fp32 and bf16. This is the denominator of every ratio below.
2. For a few (width, depth, video tokens) points, one training step of ``models.dit.DiT``:
   forward + flow-matching-style MSE loss + backward, no optimizer (AdamW is O(params) and
   would only add a constant that has nothing to do with matmul throughput), batch 1,
   64 text tokens, in fp32 and in bf16 autocast.
3. The same step of diffusers' ``WanTransformer3DModel`` configured to the same width,
   depth, heads, ffn_dim, patch (1, 2, 2), 16 latent channels and text length, timed
   interleaved with ours (ours, peer, ours, peer, ...) so machine noise hits both.

FLOPs are counted, not estimated: one fwd+bwd of each model runs under
``torch.utils.flop_counter.FlopCounterMode`` (this is also the warm-up step, so it is never
timed). Our closed form ``3 * models.costs.dit_forward_flops`` is printed beside the count.

Run (from the repository root; diffusers is the optional ``[bench]`` extra):
    python bench/step.py            # the full table, under ~10 minutes on 2 cores
    python bench/step.py --quick    # a tiny subset, well under a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script: make `models` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.costs import dit_forward_flops  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402

CHANNELS = 16  # latent channels of the TAE (SPEC §3)
CONTEXT = 64  # text tokens
HEAD_DIM = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One benchmark point: a model size and a latent (T, H, W) patchified 1x2x2."""

    width: int
    depth: int
    latent: tuple[int, int, int]
    dtype: str

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


# Latents (T, H, W): (4, 32, 32) -> 1024 tokens, (8, 32, 32) -> 2048, (4, 64, 64) -> 4096,
# (16, 64, 64) -> 16384. Depth is cut where a step would take tens of seconds on 2 cores.
FULL = [
    Case(256, 2, (4, 32, 32), "fp32"),
    Case(256, 2, (4, 64, 64), "fp32"),
    Case(256, 1, (16, 64, 64), "fp32"),
    Case(512, 2, (4, 32, 32), "fp32"),
    Case(512, 2, (8, 32, 32), "fp32"),
    Case(512, 2, (4, 64, 64), "fp32"),
    Case(1024, 1, (4, 32, 32), "fp32"),
    Case(1024, 1, (4, 64, 64), "fp32"),
    # bf16 matmuls in the backward pass fall back to a slow reference kernel on CPUs
    # without AVX512-BF16 (see the peak table), so bf16 stays at the smallest size.
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


def matmul_peaks(quick: bool) -> tuple[dict[str, float], list[tuple[str, str, int, float]]]:
    """Peak FLOP/s per dtype, plus the measurements behind it.

    fp32 is layout-blind (MKL). bf16 is not: without AVX512-BF16, a @ b (NN) goes to
    torch's reference gemm at ~1 GFLOP/s while a @ b.T and a.T @ b are vectorised, so the
    slow layout is shown at a small n only and the peak is the best layout at large n.
    """
    n32, n16 = (1024, 512) if quick else (4096, 2048)
    rows = [("fp32", "NN", n32, matmul_rate(torch.float32, n32, "NN", 3 if quick else 5))]
    rows.append(("bf16", "NN", 512, matmul_rate(torch.bfloat16, 512, "NN", 1)))
    for layout in ("NT", "TN"):
        rows.append(("bf16", layout, n16, matmul_rate(torch.bfloat16, n16, layout, 3)))
    peaks = {dt: max(r[3] for r in rows if r[0] == dt and (r[2] > 512 or quick)) for dt in DTYPES}
    return peaks, rows


# ---------------------------------------------------------------- models

def build_ours(case: Case) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    cfg = DiTConfig(width=case.width, depth=case.depth, heads=case.heads,
                    ffn_dim=case.ffn_dim, in_channels=CHANNELS)
    model = DiT(cfg)
    model.init_weights()
    randomise(model)

    def forward(x, t, context, mask):
        return model(x, t, context, mask)
    return model, forward


def build_peer(case: Case) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]] | None:
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
        # Wan's blocks take no text mask; its timestep is in [0, 1000].
        return model(x, 1000 * t, context, return_dict=False)[0]
    return model, forward


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Perturb every weight (as tests/test_dit.py does) so zero-init gates carry signal."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    t, h, w = case.latent
    x = torch.randn(1, CHANNELS, t, h, w)
    context = torch.randn(1, CONTEXT, case.width)
    mask = torch.ones(1, CONTEXT, dtype=torch.bool)  # our trainer always passes one
    return x, torch.rand(1), context, mask, torch.randn_like(x)


def train_step(model: torch.nn.Module, forward: Callable[..., torch.Tensor],
               inputs: tuple[torch.Tensor, ...], dtype: str) -> None:
    x, t, context, mask, target = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = forward(x, t, context, mask)
    loss = (out.float() - target).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


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


def counted_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops()


# ---------------------------------------------------------------- one case

@dataclass
class Result:
    name: str
    flops: int
    analytic: int | None
    seconds: float


def run_case(case: Case, reps: int, with_peer: bool) -> list[Result]:
    torch.manual_seed(0)
    inputs = make_inputs(case)
    builders = [("ours", build_ours)] + ([("Wan (diffusers)", build_peer)] if with_peer else [])
    models = [(name, built) for name, build in builders if (built := build(case)) is not None]
    steps = {name: (lambda m=m, f=f: train_step(m, f, inputs, case.dtype))
             for name, (m, f) in models}
    # The counted step doubles as the warm-up: it is never timed.
    flops = {name: counted_flops(step) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):  # interleaved, so a noisy moment hits both models
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    cfg = DiTConfig(width=case.width, depth=case.depth, heads=case.heads,
                    ffn_dim=case.ffn_dim, in_channels=CHANNELS)
    analytic = 3 * dit_forward_flops(cfg, case.tokens, CONTEXT)
    return [Result(name, flops[name], analytic if name == "ours" else None, min(times[name]))
            for name in steps]


def reps_for(case: Case, quick: bool) -> int:
    """More repetitions where a step is short, so every case costs a similar few seconds."""
    if quick:
        return 2
    return 2 if case.tokens >= 16384 or (case.width >= 1024 and case.tokens >= 4096) else 4


# ---------------------------------------------------------------- output

def peak_table(peaks: dict[str, float], rows: list[tuple[str, str, int, float]]) -> str:
    lines = ["| dtype | layout | n | GFLOP/s |", "|---|---|---:|---:|"]
    lines += [f"| {dt} | {layout} | {n} | {rate / 1e9:.1f} |" for dt, layout, n, rate in rows]
    used = ", ".join(f"{dt} {rate / 1e9:.1f}" for dt, rate in peaks.items())
    return "\n".join(lines) + f"\n\nPeak used as denominator (GFLOP/s): {used}"


HEADER = ("| dtype | width | depth | tokens | latent T,H,W | model | step s | tokens/s "
          "| GFLOP counted | GFLOP 3x analytic | GFLOP/s | / mm peak |")


def result_row(case: Case, r: Result, peak: float) -> str:
    rate = r.flops / r.seconds
    analytic = f"{r.analytic / 1e9:.1f}" if r.analytic is not None else "-"
    latent = ",".join(map(str, case.latent))
    return (f"| {case.dtype} | {case.width} | {case.depth} | {case.tokens} | {latent} "
            f"| {r.name} | {r.seconds:.3f} | {case.tokens / r.seconds:,.0f} "
            f"| {r.flops / 1e9:.1f} | {analytic} | {rate / 1e9:.1f} | {rate / peak:.2f} |")


# ---------------------------------------------------------------- main

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

    Any such job (a training run, pytest, another bench) halves what 2 cores give us, so
    this looks at CPU use rather than at a list of names."""
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
    """Wait (until ``deadline``, a time.monotonic()) while another job uses the cores.

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (seconds)")
    parser.add_argument("--no-peer", action="store_true", help="time our DiT only")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for other busy processes (trainer, pytest) to finish")
    parser.add_argument("--only", default=None,
                        help="run the cases whose 'dtype/width/tokens' contains this string")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Checked before every case too: another job can start in the middle of the run.
    deadline = time.monotonic() + (0 if args.no_wait else 15 * 60)
    wait_for_quiet(deadline)
    waited = 0.0
    began = time.perf_counter()
    cases = QUICK if args.quick else FULL
    if args.only:
        cases = [c for c in cases if args.only in f"{c.dtype}/{c.width}/{c.tokens}"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    peaks, rows = matmul_peaks(args.quick)
    print(peak_table(peaks, rows) + "\n", flush=True)
    print(f"Step = forward + MSE loss + backward, no optimizer; batch 1, {CONTEXT} text tokens; "
          f"heads = width/{HEAD_DIM}, ffn_dim = 4*width; best of interleaved reps.\n")
    print(HEADER)
    print("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for case in cases:
        waited += wait_for_quiet(deadline)
        for result in run_case(case, reps_for(case, args.quick), not args.no_peer):
            print(result_row(case, result, peaks[case.dtype]), flush=True)
    print(f"\nwall time {time.perf_counter() - began - waited:.0f} s (not counting waits)")


if __name__ == "__main__":
    main()
