"""The GPU smoke script's CPU-checkable parts: its refusal without CUDA, the step bench's
scale plan and its peak-FLOP lookup (the full ``--cpu-dry-run`` takes minutes: not here)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import step, step_scale

REPO = Path(__file__).resolve().parents[1]


def scale_args(**overrides) -> argparse.Namespace:
    values = dict(model="conf/model/dit_1b.yaml", width=None, depth=None, heads=None,
                  ffn_dim=None, latent=list(step.LATENT_256PX), dtype="bf16",
                  max_tokens=65536)
    return argparse.Namespace(**{**values, **overrides})


def test_scale_plan_starts_at_dit_1b_256px_and_doubles_the_frames():
    cases = step_scale.scale_cases(scale_args())
    first = cases[0]
    assert (first.width, first.depth, first.heads, first.ffn_dim) == (1536, 24, 16, 4096)
    assert first.latent == (32, 32, 32) and first.tokens == 8192
    assert [c.tokens for c in cases] == [8192, 16384, 32768, 65536]
    # position tables grow to the longest latent
    assert cases[-1].dit_config().max_patches_t == 256


def test_scale_plan_takes_overrides():
    cases = step_scale.scale_cases(scale_args(width=64, heads=2, ffn_dim=128, depth=1,
                                        latent=[2, 8, 8], max_tokens=100))
    assert [(c.width, c.heads, c.ffn_dim, c.depth, c.tokens) for c in cases] == [
        (64, 2, 128, 1, 32), (64, 2, 128, 1, 64)]


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0),
                                          ("NVIDIA H200", 989.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_gpu_peak_is_matched_on_the_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = step_scale.gpu_peak_flops(torch.device("cuda"), None)
    assert peak == tflops * 1e12 and "parallel.plan.GPUS" in source


def test_unknown_gpu_asks_for_its_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    with pytest.raises(SystemExit, match="--peak-tflops"):
        step_scale.gpu_peak_flops(torch.device("cuda"), None)
    assert step_scale.gpu_peak_flops(torch.device("cuda"), 121.0)[0] == 121e12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_smoke_script_refuses_without_cuda_and_touches_nothing(tmp_path):
    out = tmp_path / "smoke"
    result = subprocess.run(["bash", str(REPO / "bench/gpu_smoke.sh")], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert result.returncode == 1
    assert "--cpu-dry-run" in result.stderr and "no CUDA device" in result.stderr
    assert not out.exists()
