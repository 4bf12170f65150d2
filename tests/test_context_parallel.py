"""Context-parallel attention equals full SDPA, on gloo processes (cp = 2 and 4).

Each spawned run (a few seconds of start-up) does many checks and returns numbers; the
tests assert on them. Reference: fp32 math SDPA over the whole unpadded sequence.
"""

from __future__ import annotations

import os
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from parallel.comm_counter import CommCounter
from parallel.context_parallel import (
    MODES,
    SequenceShards,
    context_parallel_attention,
    cp_attention_comm_bytes,
)
from tests.distributed import run_distributed

BATCH, HEADS, HEAD_DIM = 2, 4, 8
TOLERANCE = 1e-5
EXPECTED_KINDS = {  # collective kinds each mode issues: (forward, backward)
    "allgather_kv": ({"all_gather"}, {"reduce_scatter"}),
    "ulysses": ({"all_to_all"}, {"all_to_all"}),
    "ring": ({"send"}, {"send"}),
}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def _start() -> SequenceShards:
    dist.init_process_group("gloo")
    return SequenceShards(dist.group.WORLD)


def _compare(shards: SequenceShards, mode: str, length: int) -> dict:
    """One CP attention call against the reference: relative errors and bytes sent."""
    generator = torch.Generator().manual_seed(length)
    q, k, v, weight = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=generator)
                       for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(*full)
    (reference * weight).sum().backward()

    local = [shards.shard(t, dim=2).detach().requires_grad_() for t in (q, k, v)]
    attention = context_parallel_attention(mode, shards)
    with CommCounter() as forward:
        out = attention(*local, None)
    loss = (shards.gather(out, dim=2) * weight).sum()  # replicated on every cp rank
    with CommCounter() as backward:
        loss.backward()
    got = [shards.gather(t.detach(), dim=2) for t in (out, *(t.grad for t in local))]
    expected = [reference, *(t.grad for t in full)]
    return {
        "errors": {name: _relative_error(a, b)
                   for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected, strict=True)},
        "finite": all(torch.isfinite(t).all().item() for t in (out, *(t.grad for t in local))),
        "sent": {"forward": dict(forward.sent), "backward": dict(backward.sent)},
        "predicted": cp_attention_comm_bytes(mode, BATCH, HEADS, shards.padded_length,
                                             HEAD_DIM, shards.size, 4),
    }


def _shard_gather(shards: SequenceShards) -> dict:
    """Round trips along dim 1 (odd length) and dim -1, and the gradient through both."""
    out = {}
    for name, shape, dim in (("dim1", (2, 13, 3), 1), ("dim-1", (2, 3, 6), -1)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        local = shards.shard(x, dim=dim)
        back = shards.gather(2 * local, dim=dim)
        (back * weight).sum().backward()
        grad = x.grad.clone()
        dist.all_reduce(grad)  # each rank's x.grad holds its own tokens' part
        out[name] = {"local_shape": tuple(local.shape), "valid": shards.valid_length,
                     "padded": shards.padded_length,
                     "round_trip": (back.detach() - 2 * x.detach()).abs().max().item(),
                     "grad": (grad - 2 * weight).abs().max().item()}
    return out


def _error_messages(shards: SequenceShards) -> dict:
    def message(call) -> str:
        try:
            call()
        except (ValueError, RuntimeError) as error:
            return f"{type(error).__name__}: {error}"
        return "no error"

    x = torch.randn(1, 3, 8, 4)
    local = shards.shard(x, dim=2)
    mask = torch.ones(1, 1, 1, local.size(2), dtype=torch.bool)
    unsplit = SequenceShards(shards.group)
    return {
        "heads": message(lambda: context_parallel_attention("ulysses", shards)(
            local, local, local, None)),
        "mask": message(lambda: context_parallel_attention("ring", shards)(
            local, local, local, mask)),
        "mode": message(lambda: context_parallel_attention("flash", shards)),
        "unsplit": message(lambda: context_parallel_attention("ring", unsplit)(
            local, local, local, None)),
        "length": message(lambda: context_parallel_attention("allgather_kv", shards)(
            local[:, :, :1], local[:, :, :1], local[:, :, :1], None)),
    }


def _libraries(shards: SequenceShards) -> dict:
    """Our Ulysses against DeepSpeed's, and what CommCounter sees of DTensor and FSDP2."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    # DeepSpeed wraps the running torch process group. Its shared-memory op only speeds up
    # CPU all-reduce and costs a JIT build on a cold cache; the oracle needs all-to-all only.
    with mock.patch("deepspeed.comm.torch.build_shm_op", return_value=None):
        deepspeed.comm.init_distributed(dist_backend="gloo")

    def local_attention(q, k, v, key_valid):  # DeepSpeed's layout: (B, L, h/cp, d)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid)
        return out.transpose(1, 2)

    deepspeed_attention = DistributedAttention(local_attention, dist.group.WORLD,
                                               scatter_idx=2, gather_idx=1)
    errors = {}
    for length in (8, 13):
        generator = torch.Generator().manual_seed(length)
        q, k, v, weight = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=generator)
                           for _ in range(4))
        ours = [shards.shard(t, dim=2).detach().requires_grad_() for t in (q, k, v)]
        theirs = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in ours]
        w = shards.shard(weight, dim=2)
        key_valid = (torch.arange(shards.padded_length) < length)[None, None, None, :]
        out = context_parallel_attention("ulysses", shards)(*ours, None)
        (out * w).sum().backward()
        ds_out = deepspeed_attention(*theirs, 0, None, key_valid).transpose(1, 2)
        (ds_out * w).sum().backward()
        pairs = [(out, ds_out)] + [(a.grad, b.grad.transpose(1, 2)) for a, b in zip(
            ours, theirs, strict=True)]
        errors[length] = [_relative_error(a.detach(), b.detach()) for a, b in pairs]

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with CommCounter() as dtensor:
        sharded = distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)])
        sharded.redistribute(mesh, [Replicate()])
    layer = torch.nn.Linear(4, 8)
    fully_shard(layer, mesh=mesh)
    with CommCounter() as fsdp_forward:
        loss = layer(torch.randn(3, 4)).sum()
    with CommCounter() as fsdp_backward:
        loss.backward()
    counters = {"dtensor": dtensor, "fsdp_forward": fsdp_forward,
                "fsdp_backward": fsdp_backward}
    return {"ulysses_vs_deepspeed": errors,
            "counted": {name: (dict(c.sent), dict(c.calls)) for name, c in counters.items()}}


def _isolated(check, *args):
    """Run a check inside a shared spawn; a failure fails only the test reading it."""
    try:
        return check(*args)
    except Exception:
        return {"traceback": traceback.format_exc()}


def cp2_worker() -> dict:
    shards = _start()
    return {"compare": {(mode, length): _compare(shards, mode, length)
                        for mode in MODES for length in (8, 13)},
            "shard_gather": _shard_gather(shards), "errors": _error_messages(shards),
            "libraries": _isolated(_libraries, shards)}  # last: it builds meshes and FSDP


def cp4_worker() -> dict:
    shards = _start()
    # 9 tokens over 4 ranks: chunks of 3, the last rank's chunk is all padding; 13: chunks
    # of 4 with one padded row on the last rank
    compare = {(mode, length): _compare(shards, mode, length)
               for mode in MODES for length in (9, 16)}
    compare["ring", 13] = _compare(shards, "ring", 13)
    return {"compare": compare}


@pytest.fixture(scope="module")
def cp2():
    return run_distributed(cp2_worker, 2)


@pytest.fixture(scope="module")
def cp4():
    return run_distributed(cp4_worker, 4)


@pytest.mark.parametrize("world", ["cp2", "cp4"])
def test_matches_full_sdpa_forward_and_backward(world, request):
    for rank_results in request.getfixturevalue(world):
        for (mode, length), result in rank_results["compare"].items():
            assert result["finite"], (mode, length)
            worst = max(result["errors"].values())
            assert worst <= TOLERANCE, f"{world} {mode} L={length}: {result['errors']}"


@pytest.mark.parametrize("world", ["cp2", "cp4"])
def test_comm_bytes_formula_matches_counted_collectives(world, request):
    for rank_results in request.getfixturevalue(world):
        for (mode, length), result in rank_results["compare"].items():
            sent, predicted = result["sent"], result["predicted"]
            for phase, kinds in zip(("forward", "backward"), EXPECTED_KINDS[mode], strict=True):
                assert set(sent[phase]) == kinds, (mode, length, phase, sent)
                assert sum(sent[phase].values()) == predicted[phase], (mode, length, phase)
            assert predicted["total"] == predicted["forward"] + predicted["backward"]


def test_shard_and_gather_round_trip_with_gradients(cp2):
    for rank, rank_results in enumerate(cp2):
        dim1, last = rank_results["shard_gather"]["dim1"], rank_results["shard_gather"]["dim-1"]
        assert dim1["local_shape"] == (2, 7, 3) and (dim1["valid"], dim1["padded"]) == (13, 14)
        assert last["local_shape"] == (2, 3, 3) and (last["valid"], last["padded"]) == (6, 6)
        for result in (dim1, last):
            assert result["round_trip"] == 0.0, rank
            assert result["grad"] <= 1e-6, rank


def test_clear_errors(cp2):
    errors = cp2[0]["errors"]
    assert "ulysses context parallel needs heads divisible by cp: 3 local heads, cp=2" in (
        errors["heads"])
    assert "does not take a key mask" in errors["mask"]
    assert "unknown context-parallel attention mode 'flash'" in errors["mode"]
    assert "allgather_kv, ulysses, ring" in errors["mode"]
    assert "call shard(x)" in errors["unsplit"]
    assert "got 1 local tokens but the last shard() made chunks of 4" in errors["length"]


def test_ulysses_matches_deepspeed_and_counter_sees_dtensor_and_fsdp2(cp2):
    for rank_results in cp2:
        libraries = rank_results["libraries"]
        assert "traceback" not in libraries, libraries.get("traceback")
        for length, errors in libraries["ulysses_vs_deepspeed"].items():
            assert max(errors) <= TOLERANCE, (length, errors)
        counted = libraries["counted"]
        # DTensor Shard(0) -> Replicate: a functional all-gather of the local (4, 6) fp32 shard
        assert counted["dtensor"][0] == {"all_gather": 4 * 6 * 4}
        # FSDP2 on Linear(4, 8): all-gather 20 of 40 parameters, reduce-scatter 40 gradients
        assert counted["fsdp_forward"][0] == {"all_gather": 20 * 4}
        assert counted["fsdp_backward"][0]["reduce_scatter"] == 40 * 4 // 2
