"""Ring attention's per-step kernels in one process, against full SDPA.

The ring steps of every cp rank are replayed in order: each rank's query chunk runs the
fused kernel over each K/V chunk (its real tokens only), the partial results merge by
log-sum-exp, and each block's fused backward runs against the merged output and LSE.
tests/test_context_parallel.py checks the whole ring on gloo processes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from parallel.context_parallel import _fused_backward, _fused_forward, _fused_kernel, _merge_block

BATCH, HEADS, HEAD_DIM = 2, 3, 8


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def _reference(q, k, v, weight) -> dict[str, torch.Tensor]:
    """fp32 math SDPA over the unpadded sequence: out, LSE and the gradients of sum(out*w)."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v)
    (out * weight).sum().backward()
    lse = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).logsumexp(-1)
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _ring_steps(q, k, v, weight, cp: int) -> dict[str, torch.Tensor]:
    """The ring's forward and backward steps of all cp ranks, in one process, with the
    sequence zero-padded to cp chunks as SequenceShards pads it; results cut back to L."""
    length = q.size(2)
    local = -(-length // cp)
    pad = (0, 0, 0, cp * local - length)
    q, k, v, weight = (F.pad(t, pad).chunk(cp, dim=2) for t in (q, k, v, weight))
    valid = [max(0, min(local, length - block * local)) for block in range(cp)]
    outs, lses, dqs = [], [], []
    dks = [torch.zeros_like(t, dtype=torch.float32) for t in k]
    dvs = [torch.zeros_like(t, dtype=torch.float32) for t in v]
    for rank in range(cp):
        order = [(rank - step) % cp for step in range(cp) if valid[(rank - step) % cp]]
        out = torch.zeros_like(q[rank], dtype=torch.float32)
        lse = torch.full(q[rank].shape[:-1], -math.inf)
        for block in order:
            keys = valid[block]
            partial = _fused_forward("cpu", q[rank], k[block][:, :, :keys], v[block][:, :, :keys])
            out, lse = _merge_block(out, lse, *partial)
        out = out.to(q[rank].dtype)
        grad_out = weight[rank].to(out.dtype)
        dq = torch.zeros_like(out, dtype=torch.float32)
        for block in order:
            keys = valid[block]
            block_dq, block_dk, block_dv = _fused_backward(
                "cpu", grad_out, q[rank], k[block][:, :, :keys], v[block][:, :, :keys], out, lse)
            dq += block_dq
            dks[block][:, :, :keys] += block_dk
            dvs[block][:, :, :keys] += block_dv
        outs.append(out)
        lses.append(lse)
        dqs.append(dq)
    joined = {"out": outs, "lse": lses, "dq": dqs, "dk": dks, "dv": dvs}
    return {name: torch.cat(parts, dim=2).narrow(2, 0, length) for name, parts in joined.items()}


@pytest.mark.parametrize("length, cp", [(16, 2), (13, 2), (9, 4), (13, 4)])
def test_fp32_ring_steps_match_sdpa(length, cp):
    """Even chunks, a padded last chunk, and (9 over 4) a chunk of pure padding."""
    generator = torch.Generator().manual_seed(length * cp)
    q, k, v, weight = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=generator)
                       for _ in range(4))
    got, expected = _ring_steps(q, k, v, weight, cp), _reference(q, k, v, weight)
    assert got["lse"].dtype == torch.float32
    for name, value in expected.items():
        assert torch.isfinite(got[name]).all(), name
        assert _relative_error(got[name], value) <= 1e-5, (name, length, cp)


def test_bf16_ring_steps_merge_in_fp32():
    """bf16 blocks: the merged LSE and the gradient sums stay fp32, the output is bf16, and
    all are within bf16 rounding of the fp32 reference."""
    generator = torch.Generator().manual_seed(5)
    q, k, v, weight = (torch.randn(BATCH, HEADS, 29, HEAD_DIM, generator=generator)
                       for _ in range(4))
    low = [t.bfloat16() for t in (q, k, v)]
    got = _ring_steps(*low, weight, 4)
    expected = _reference(*(t.float() for t in low), weight)
    assert got["out"].dtype == torch.bfloat16
    assert {got[name].dtype for name in ("lse", "dq", "dk", "dv")} == {torch.float32}
    for name, value in expected.items():
        assert _relative_error(got[name], value) <= 2e-2, name


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_cuda_kernels_bind_to_their_op_schemas(kernel):
    """The CUDA branches on meta tensors: arguments bind to the aten schemas and the shapes
    and dtypes come back as the ring expects (the numbers need a GPU)."""
    q = torch.empty(BATCH, HEADS, 40, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(BATCH, HEADS, 24, 64, dtype=torch.bfloat16, device="meta")
    out, lse = _fused_forward(kernel, q, k, k)
    assert (out.shape, out.dtype) == (q.shape, torch.bfloat16)
    assert (lse.shape, lse.dtype) == ((BATCH, HEADS, 40), torch.float32)
    dq, dk, dv = _fused_backward(kernel, out, q, k, k, out, lse.contiguous())
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)


def test_unsupported_device_is_named():
    q = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="no fused attention kernel.*on meta.*allgather_kv"):
        _fused_kernel(q, q, q)
