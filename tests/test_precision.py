"""Precision defaults resolve by device, explicit values win, impossible ones are refused;
both engines implement the one interface the trainer drives."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from parallel.deepspeed_engine import DeepSpeedEngine, ds_config
from parallel.engine import NativeEngine, TrainingEngine
from parallel.mesh import MeshDims, ParallelContext
from tests.conftest import compose_train
from tests.distributed import run_distributed
from trainer import precision
from trainer.config import ConfigError, Precision
from trainer.precision import ResolvedPrecision, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device has bf16 (``True``) or is older (``False``)."""
    def pretend(bf16: bool) -> None:
        monkeypatch.setattr(precision, "has_bf16", lambda device: device.type != "cuda" or bf16)
    return pretend


# (device, bf16 on the GPU, overrides, sharded) -> (autocast, sharded param dtype, tf32)
TABLE = [
    (CPU, True, [], True, (Precision.fp32, FP32, False)),
    (CPU, True, [], False, (Precision.fp32, None, False)),
    (CPU, True, ["trainer.precision=bf16"], True, (Precision.bf16, BF16, False)),
    (CPU, True, ["parallel.param_dtype=bf16"], True, (Precision.fp32, BF16, False)),
    (CPU, True, ["trainer.tf32=false"], True, (Precision.fp32, FP32, False)),
    (CUDA, True, [], True, (Precision.bf16, BF16, True)),
    (CUDA, True, [], False, (Precision.bf16, None, True)),
    (CUDA, True, ["trainer.precision=fp32"], True, (Precision.fp32, FP32, True)),
    (CUDA, True, ["trainer.precision=fp32", "parallel.param_dtype=bf16"], True,
     (Precision.fp32, BF16, True)),
    (CUDA, True, ["parallel.param_dtype=fp32"], True, (Precision.bf16, FP32, True)),
    (CUDA, True, ["trainer.tf32=false"], True, (Precision.bf16, BF16, False)),
    (CUDA, False, [], True, (Precision.fp32, FP32, True)),
    (CUDA, True, ["parallel.engine=deepspeed"], True, (Precision.bf16, BF16, True)),
]


@pytest.mark.parametrize("device, bf16, overrides, sharded, expected", TABLE)
def test_resolution_by_device_and_explicit_values(gpu, device, bf16, overrides, sharded,
                                                  expected):
    gpu(bf16)
    cfg = compose_train(overrides)
    resolved = resolve_precision(cfg, device, sharded)
    assert (resolved.autocast, resolved.param_dtype, resolved.tf32) == expected
    # the helpers the model builders and the step use agree with the resolution
    assert precision.compute_precision(cfg, device) is expected[0]
    if sharded:
        assert precision.param_dtype(cfg, device) is expected[1]


def test_defaults_are_auto():
    cfg = compose_train()
    assert cfg.trainer.precision is Precision.auto
    assert cfg.parallel.param_dtype is Precision.auto and cfg.trainer.tf32 is None
    with precision.autocast(cfg, CPU):
        assert not torch.is_autocast_enabled("cpu")  # auto on the CPU: fp32


@pytest.mark.parametrize("device, bf16, overrides, sharded, message", [
    (CPU, True, ["parallel.param_dtype=bf16"], False,
     r"^parallel.param_dtype=bf16 .* FSDP is off .*: set parallel.param_dtype=auto"),
    (CUDA, False, ["trainer.precision=bf16"], True,
     r"^trainer.precision=bf16: bf16 needs a GPU of compute capability 8.0\+"),
    (CUDA, False, ["parallel.param_dtype=bf16"], True, r"^parallel.param_dtype=bf16: bf16 needs"),
    (CUDA, True, ["parallel.engine=deepspeed", "parallel.param_dtype=bf16",
                  "trainer.precision=fp32"], True,
     r"^parallel.param_dtype=bf16 with parallel.engine=deepspeed .* set trainer.precision=bf16"),
    (CPU, True, ["trainer.tf32=true"], True,
     r"^trainer.tf32=true .* trainer.device=cpu: set trainer.tf32=null"),
])
def test_impossible_combinations_name_the_key_and_the_fix(gpu, device, bf16, overrides,
                                                          sharded, message):
    gpu(bf16)
    with pytest.raises(ConfigError, match=message) as error:
        resolve_precision(compose_train(overrides), device, sharded)
    assert "\n" not in str(error.value)


def test_pixel_loss_dtype_is_never_auto():
    with pytest.raises(ConfigError, match="recipe.pixel_loss.dtype=auto .* set fp32 or bf16"):
        compose_train(["recipe.pixel_loss.dtype=auto"])


def test_resolved_precision_is_logged_in_one_line():
    line = ResolvedPrecision(Precision.bf16, BF16, True).describe()
    assert line == ("precision: bf16 autocast, weights gathered in bfloat16, fp32 reduction "
                    "and master weights, TF32 matmuls on")
    assert ResolvedPrecision(Precision.fp32, None, False).describe() == (
        "precision: fp32 (no autocast), fp32 weights, fp32 reduction and master weights, "
        "TF32 matmuls off")


def test_tf32_switch_touches_cuda_only():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.allow_tf32)
    precision.apply_tf32(ResolvedPrecision(Precision.fp32, None, False), CPU)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.allow_tf32) == before
    try:
        precision.apply_tf32(ResolvedPrecision(Precision.bf16, None, True), CUDA)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # inductor reads this
        precision.apply_tf32(ResolvedPrecision(Precision.bf16, None, False), CUDA)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = before[1]


def test_deepspeed_config_gets_the_bf16_section():
    settings = {"batch_size": 4, "dp_size": 2, "grad_clip": 1.0, "zero_stage": 2,
                "offload_optimizer": False, "offload_params": False}
    fp32 = ds_config(**settings)
    assert "bf16" not in fp32 and "communication_data_type" not in fp32
    bf16 = ds_config(**settings, bf16=True)
    assert bf16["bf16"] == {"enabled": True} and bf16["communication_data_type"] == "fp32"
    assert {k: v for k, v in bf16.items() if k in fp32} == fp32


def test_the_engine_builder_passes_the_resolved_precision(gpu, monkeypatch):
    from parallel import deepspeed_engine
    from trainer.build import build_engine

    gpu(True)
    built = {}
    monkeypatch.setattr(deepspeed_engine, "DeepSpeedEngine",
                        lambda model, make_optimizer, ctx, **kwargs: built.update(kwargs))
    cfg = compose_train(["parallel.engine=deepspeed"])
    for device, bf16 in ((CUDA, True), (CPU, False)):
        ctx = ParallelContext(MeshDims(dp_shard=1), 0, 1, device)
        build_engine(cfg, nn.Linear(2, 2), ctx)
        assert built["bf16"] is bf16
        assert resolve_precision(cfg, device, True).param_dtype is (BF16 if bf16 else FP32)


def members(cls) -> dict[str, inspect.Signature | None]:
    """Public methods' signatures (None for attributes) of the interface's members."""
    return {name: inspect.signature(getattr(cls, name)) if callable(getattr(cls, name, None))
            else None for name in PROTOCOL}


PROTOCOL = [name for name in vars(TrainingEngine) if not name.startswith("_")] + \
    list(TrainingEngine.__annotations__)


@pytest.mark.parametrize("engine", [NativeEngine, DeepSpeedEngine])
def test_both_engines_implement_the_interface(engine):
    expected = members(TrainingEngine)
    assert {"save", "load", "release_params", "num_trainable", "clip_and_step",
            "module", "scheduler"} <= expected.keys()
    for name, signature in expected.items():
        if signature is None:
            continue  # an attribute, set in __init__
        assert hasattr(engine, name), f"{engine.__name__} lacks {name}"
        got = inspect.signature(getattr(engine, name))
        assert list(got.parameters) == list(signature.parameters), f"{engine.__name__}.{name}"


def test_native_engine_saves_and_loads_through_the_interface(tmp_path):
    def make_optimizer(params):
        return torch.optim.AdamW(params, lr=0.1), None

    torch.manual_seed(0)
    engine = NativeEngine(nn.Linear(3, 2), make_optimizer)
    engine.module(torch.randn(4, 3)).square().sum().backward()
    engine.optimizer.step()
    ema = {name: t.detach() * 2 for name, t in engine.ema_tensors().items()}
    engine.release_params()
    written = engine.save(tmp_path, ema, {"step": 3})
    assert (tmp_path / "trainer_state.pt") in written
    fresh = NativeEngine(nn.Linear(3, 2), make_optimizer)
    fresh_ema = {name: torch.zeros_like(t) for name, t in ema.items()}
    assert fresh.load(tmp_path, fresh_ema) == {"step": 3}
    assert fresh.num_trainable() == engine.num_trainable() == 8
    for name, param in engine.module.named_parameters():
        assert torch.equal(dict(fresh.module.named_parameters())[name], param)
        assert torch.equal(fresh_ema[name], ema[name])
    state = fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], engine.optimizer.state_dict()["state"][i]
                           ["exp_avg"]) for i in state)


def test_ema_of_bf16_weights_averages_in_fp32():
    """DeepSpeed's bf16 section leaves the EMA bf16 weights; at decay 0.999 a bf16 average
    would never move."""
    from trainer.ema import EMA

    weight = torch.ones(4, dtype=BF16)
    ema = EMA({"w": weight}, decay=0.999)
    weight.add_(0.25)
    for step in range(10_000, 10_100):
        ema.update(step, torch.tensor(True))
    assert ema.shadow["w"].dtype == FP32
    torch.testing.assert_close(ema.shadow["w"], torch.full((4,), 1 + 0.25 * (1 - 0.999 ** 100)))
    with ema.swapped_in():
        assert weight.dtype == BF16 and weight[0].item() == pytest.approx(1.024, abs=4e-3)
    assert torch.equal(weight, torch.full((4,), 1.25, dtype=BF16))


def deepspeed_bf16_steps(_) -> dict:
    """Two ZeRO-2 ranks with the bf16 section: a refused step, then two allowed ones."""
    from tests.test_deepspeed_engine import BASE, CAPTIONS
    from trainer.build import build_autoencoder, build_engine, build_flow, build_model
    from trainer.draws import StepDraws
    from trainer.ema import EMA
    from trainer.objective import flow_matching_loss
    from trainer.train import start_parallel

    cfg = compose_train(BASE + ["trainer.precision=bf16", "recipe.lr=1e-2",
                                "recipe.warmup_steps=1", "recipe.grad_clip=0"])
    ctx = start_parallel(cfg)
    reference, engine = build_model(cfg, ctx), build_engine(cfg, build_model(cfg, ctx), ctx)
    ema = EMA(engine.ema_tensors(), 0.999)
    autoencoder, flow = build_autoencoder(cfg, ctx.device), build_flow(cfg)
    video = torch.rand(4, 3, 2, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    rows = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)
    fp32_loss = flow_matching_loss(reference, autoencoder, flow, video, CAPTIONS,
                                   StepDraws(0, 1), 0.0).item()
    weights, losses, changed = engine.full_state_dict(), [], []
    for allow in (False, True, True):  # the same batch and draws: the loss must drop
        engine.zero_grad()
        with precision.autocast(cfg, ctx.device):
            loss = flow_matching_loss(engine.module, autoencoder, flow, video[rows],
                                      CAPTIONS[rows], StepDraws(0, 1), 0.0, rows)
        losses.append(ctx.mean_over_dp(loss.detach()).item())
        engine.backward(loss)
        engine.clip_and_step(math.inf, lambda norm, allow=allow: allow)
        engine.scheduler.step()
        now = engine.full_state_dict()
        changed.append(sum(not torch.equal(now[n], weights[n]) for n in weights))
        weights = now
    return {"losses": losses, "fp32_loss": fp32_loss, "changed": changed,
            "dtypes": {p.dtype for p in engine.module.parameters()},
            "reduce": engine.engine.communication_data_type,
            "ema": {s.dtype for s in ema.shadow.values()}}


def test_deepspeed_bf16_section_trains_with_fp32_master_and_reduction():
    for result in run_distributed(deepspeed_bf16_steps, 2, None):
        assert result["dtypes"] == {BF16} and result["reduce"] == FP32
        assert result["ema"] == {FP32}
        refused, *allowed = result["changed"]
        assert refused == 0 and all(count > 0 for count in allowed)
        # the first step's loss: the same weights, computed in bf16 against fp32
        assert abs(result["losses"][0] - result["fp32_loss"]) <= 0.02 * result["fp32_loss"]
        assert result["losses"][2] < result["losses"][0]
