"""DeepSpeed ZeRO 1/2/3 (and CPU offload) compute what one process computes.

Two gloo ranks each run their half of a 4-sample global batch through DeepSpeedEngine; a
single-process reference in the same process runs the whole batch with plain AdamW, the
same LambdaLR warmup and clip_grad_norm_. Compared, relative error <= 1e-5 (fp32): the
global loss, the gradient norm, every parameter's full gradient after each backward, and
every full weight after the steps. The step plan also covers a step refused by the guard
with finite gradients (the first one, before Adam has any state), a non-finite loss that
skips backward, and non-finite gradients that DeepSpeed drops itself; none may change
anything. ZeRO-3 models are built under ``zero.Init``: each rank holds only its partition
of every parameter and draws about half of the initial values. Then: save, EMA-style
writes into ``ema_tensors`` seen by the next forward (engine or bare model), a further
step, load, and the same step again.

All cases share one spawned run (process start and the DeepSpeed import cost seconds).
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from parallel.deepspeed_engine import DeepSpeedEngine, ds_config, fill_partitions
from parallel.mesh import MeshDims, ParallelContext
from tests.conftest import compose_train
from tests.distributed import run_distributed

BASE = ["experiment=t2v_tiny", "model.width=32", "model.depth=2", "model.heads=4",
        "model.ffn_dim=48", "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
        "text.encoders.byte.ffn_dim=48", "model=dit_tiny", "data.frames=2",
        "data.height=8", "data.width=8",
        "recipe.batch_size=4", "recipe.warmup_steps=10", "recipe.lr=1e-3",
        "recipe.weight_decay=0.1", "recipe.grad_clip=0.05", "recipe.caption_dropout=0.25",
        "parallel.engine=deepspeed", "trainer.wandb.mode=disabled"]
CAPTIONS = ["a red square moving left", "a blue circle", "", "a green triangle moving up"]
# refused: finite gradients, the guard says no; nan_loss: the trainer skips backward;
# nan_grads: backward of a NaN loss on rank 0 only, DeepSpeed drops the step.
PLAN = ["refused", "nan_loss", "nan_grads", "ok", "ok", "ok"]
MAX_STEPS = 20
CASES = {  # name -> (zero_stage, offload_optimizer, offload_params)
    "zero1": (1, False, False),
    "zero2": (2, False, False),
    "zero3": (3, False, False),
    "zero2_offload": (2, True, False),
    "zero3_offload_all": (3, True, True),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def worst(actual: dict, expected: dict) -> tuple[float, str]:
    """Largest relative error over the named tensors, and its name."""
    assert actual.keys() == expected.keys()
    return max((relative_error(actual[n], expected[n]), n) for n in expected)


def gather_flat(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's 1-D ``local`` (the ZeRO-3 partition order)."""
    out = local.new_empty(local.numel() * torch.distributed.get_world_size(group))
    torch.distributed.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out


def partition_error(model: nn.Module, world: int) -> tuple[float, str]:
    """ZeRO-3 built under zero.Init: every parameter an empty placeholder whose rank-local
    partition holds a world-th of it; (1.0, name) for the first that is not."""
    for name, p in model.named_parameters():
        if p.numel() or p.ds_tensor.numel() != -(-p.ds_numel // world):
            return 1.0, name
    return 0.0, ""


def tensors_in(state) -> list[torch.Tensor]:
    """The tensors of a nested state dict, in a fixed order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors_in(state[key])]
    if isinstance(state, list | tuple):
        return [t for item in state for t in tensors_in(item)]
    return []


def run_case(ctx, name: str, directory: Path) -> dict:
    from trainer.build import build_autoencoder, build_flow, build_model
    from trainer.draws import StepDraws
    from trainer.objective import flow_matching_loss
    from trainer.optim import build_optimizer

    stage, offload_optimizer, offload_params = CASES[name]
    cfg = compose_train(BASE + [f"parallel.zero_stage={stage}"])
    recipe, seed = cfg.recipe, cfg.trainer.seed
    model = build_model(cfg, ctx)
    # the single-process model: ZeRO-1 builds it whole (only the optimizer is partitioned)
    reference = build_model(compose_train(BASE + ["parallel.zero_stage=1"]), ctx)
    engine = DeepSpeedEngine(model, lambda p: build_optimizer(p, recipe, MAX_STEPS), ctx,
                             batch_size=recipe.batch_size, grad_clip=recipe.grad_clip,
                             zero_stage=stage, offload_optimizer=offload_optimizer,
                             offload_params=offload_params)
    # Only now: the engine picks DeepSpeed's accelerator before the first import.
    from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state

    ema_tensors = engine.ema_tensors()  # taken once, as the EMA does: must stay live
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    ref_optimizer, ref_scheduler = build_optimizer(list(ref_trainable.values()), recipe,
                                                   MAX_STEPS)
    autoencoder, flow = build_autoencoder(cfg, ctx.device), build_flow(cfg)
    data = torch.Generator().manual_seed(7)
    shape = (recipe.batch_size, 3, cfg.data.frames, cfg.data.height, cfg.data.width)
    videos = [torch.rand(shape, generator=data) * 2 - 1 for _ in range(len(PLAN) + 1)]
    local = recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    errors: dict[str, tuple[float, str]] = {}

    def note(kind: str, error: tuple[float, str]) -> None:
        errors[kind] = max(errors.get(kind, (0.0, "")), error)

    if stage == 3:
        note("partitions", partition_error(model, ctx.world_size))
        drawn = fill_partitions(model, seed, ctx.rank)  # the same values again: a no-op
        total = sum(p.ds_numel for p in model.parameters())
        note("drawn_share", (max(0.0, drawn / total - 0.6), f"{drawn} of {total} drawn"))

    def reference_step(step: int, kind: str) -> tuple[float, float, dict]:
        """The whole batch in one process; the loss, norm and gradients before clipping."""
        ref_optimizer.zero_grad(set_to_none=True)
        loss = flow_matching_loss(reference, autoencoder, flow, videos[step - 1], CAPTIONS,
                                  StepDraws(seed, step), recipe.caption_dropout)
        norm, grads = math.nan, {}
        if not kind.startswith("nan"):
            loss.backward()
            grads = {n: p.grad.clone() for n, p in ref_trainable.items()}
            norm = torch.nn.utils.clip_grad_norm_(list(ref_trainable.values()),
                                                  recipe.grad_clip).item()
        if kind == "ok":
            ref_optimizer.step()
        ref_scheduler.step()
        return loss.item(), norm, grads

    def engine_step(step: int, kind: str, ref_grads: dict) -> tuple[float, float, list]:
        """The trainer's step on this rank's rows; the global loss, norm, allow_update calls."""
        engine.zero_grad()
        loss = flow_matching_loss(engine.module, autoencoder, flow, videos[step - 1][rows],
                                  CAPTIONS[rows], StepDraws(seed, step),
                                  recipe.caption_dropout, rows)
        if kind.startswith("nan") and ctx.rank == 0:
            loss = loss * math.nan
        value, norm, asked = ctx.mean_over_dp(loss).item(), math.nan, []
        if kind != "nan_loss":
            engine.backward(loss)
            if ref_grads:
                note("grad", worst({n: safe_get_full_grad(p) for n, p in trainable.items()},
                                   ref_grads))
            norm = engine.clip_and_step(recipe.grad_clip,
                                        lambda n: asked.append(n) or kind == "ok")
        engine.scheduler.step()
        return value, norm, asked

    def weights() -> dict[str, torch.Tensor]:
        return engine.full_state_dict()

    def local_optimizer_state() -> list[torch.Tensor]:
        """Every tensor of this rank's ZeRO optimizer state (fp32 master, Adam moments)."""
        return [t.clone() for t in tensors_in(engine.engine.optimizer.state_dict())]

    def moments() -> dict[str, torch.Tensor]:
        return {f"{n}.{key}": safe_get_full_optimizer_state(p, key).clone()
                for n, p in trainable.items() for key in ("exp_avg", "exp_avg_sq")}

    with pytest.raises(ValueError, match="recipe.grad_clip"):
        engine.clip_and_step(1.0, lambda n: True)
    asked_per_step, norms = [], []
    for step, kind in enumerate(PLAN, start=1):
        ref_loss, ref_norm, ref_grads = reference_step(step, kind)
        value, norm, asked = engine_step(step, kind, ref_grads)
        asked_per_step.append(asked)
        norms.append(norm)
        if not kind.startswith("nan"):
            note("loss", (abs(value - ref_loss) / abs(ref_loss), f"step {step}"))
            note("norm", (abs(norm - ref_norm) / ref_norm, f"step {step}"))
    expected = dict(reference.named_parameters())
    note("weights", worst(weights(), expected))

    # The tensors handed to the EMA at the start still hold the current weights.
    final = weights()
    for n, tensor in ema_tensors.items():
        whole = gather_flat(tensor, None) if stage == 3 else tensor
        note("ema_tensors", (relative_error(whole[: final[n].numel()].view_as(final[n]),
                                            final[n]), n))

    engine.save(directory, {}, {"step": len(PLAN)})
    saved_weights, saved_optimizer = weights(), local_optimizer_state()
    assert len(saved_optimizer) >= 3  # fp32 master, exp_avg, exp_avg_sq at least

    # EMA swap protocol: write into the local tensors, the next forward uses them.
    probe = (autoencoder.encode(videos[0]), torch.full((recipe.batch_size,), 0.3), CAPTIONS)
    halved = copy.deepcopy(reference)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5 if p.requires_grad else 1.0)
        engine.release_params()
        kept = {n: t.clone() for n, t in ema_tensors.items()}
        for tensor in ema_tensors.values():
            tensor.mul_(0.5)
        note("swapped_in", (relative_error(engine.module(*probe), halved(*probe)), "output"))
        engine.release_params()
        for n, tensor in ema_tensors.items():
            tensor.copy_(kept[n])
        # The bare model too: the trainer validates and samples with it.
        note("swapped_out", (relative_error(model(*probe), reference(*probe)), "output"))

    extra = len(PLAN) + 1
    reference_step(extra, "ok")
    engine_step(extra, "ok", {})
    uninterrupted, uninterrupted_moments = weights(), moments()
    note("after_swap", worst(uninterrupted, expected))
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint in"):
        engine.load(directory.parent, {})
    assert engine.load(directory, {}) == {"step": len(PLAN)}
    note("reloaded_weights", worst(weights(), saved_weights))
    reloaded = local_optimizer_state()
    note("reloaded_optimizer", max((relative_error(a, b), f"tensor {i}") for i, (a, b)
                                   in enumerate(zip(reloaded, saved_optimizer, strict=True))))
    lr_after_load = engine.scheduler.get_last_lr()[0]
    engine_step(extra, "ok", {})
    note("resumed_weights", worst(weights(), uninterrupted))
    note("resumed_moments", worst(moments(), uninterrupted_moments))
    return {"errors": errors, "asked": asked_per_step, "norms": norms,
            "lr_after_load": lr_after_load, "clipped": sum(n > recipe.grad_clip for n in norms
                                                           if math.isfinite(n))}


def run_cases(names: list[str], root: str) -> dict:
    from trainer.train import start_parallel

    # The refused first step warns as in one process; nothing to see in these logs.
    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
    ctx = start_parallel(compose_train(BASE))
    return {name: run_case(ctx, name, Path(root) / name) for name in names}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    names = list(CASES)
    root = tmp_path_factory.mktemp("deepspeed")
    for name in names:
        (root / name).mkdir()
    return run_distributed(run_cases, 2, names, str(root))


def check_case(name: str, per_rank: list[dict]) -> None:
    for rank, result in enumerate(per_rank):
        where = f"{name} rank {rank}"
        for kind, (error, at) in result["errors"].items():
            assert error <= 1e-5, f"{where}: {kind} {at}: relative error {error:.2e}"
        asked = result["asked"]
        # allow_update: once per backward step, never for the skipped-backward step; the
        # dropped non-finite step reports inf.
        assert [len(a) for a in asked] == [1, 0, 1, 1, 1, 1], where
        assert asked[2] == [math.inf] and result["norms"][2] == math.inf, where
        assert result["clipped"] >= 1, f"{where}: no step clipped; lower recipe.grad_clip"
        # saved after len(PLAN) scheduler steps of the 10-step warmup
        assert result["lr_after_load"] == pytest.approx(1e-3 * (len(PLAN) + 1) / 10), where


@pytest.mark.parametrize("name", list(CASES))
def test_zero_matches_one_process(name, results):
    check_case(name, [result[name] for result in results])


def test_bad_settings_name_the_key_and_the_fix():
    model = nn.Linear(2, 2)
    factory = lambda params: (torch.optim.AdamW(params), None)  # noqa: E731
    for dims, match in ((MeshDims(dp_shard=1, tp=2), "parallel.tp=2 and parallel.cp=1"),
                        (MeshDims(dp_shard=1, cp=2), "parallel.tp=1 and parallel.cp=2")):
        ctx = ParallelContext(dims.resolved(2), 0, 2, torch.device("cpu"))
        with pytest.raises(ValueError, match=rf"parallel.engine=deepspeed .*{match}.*"
                                             r"set parallel.tp=1 parallel.cp=1"):
            DeepSpeedEngine(model, factory, ctx, batch_size=4, grad_clip=1.0, zero_stage=2)
    single = ParallelContext(MeshDims(dp_shard=1), 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=1"):
        DeepSpeedEngine(model, factory, single, batch_size=4, grad_clip=1.0, zero_stage=2)
    settings = {"batch_size": 4, "dp_size": 2, "grad_clip": 1.0, "zero_stage": 2,
                "offload_optimizer": False, "offload_params": False}
    assert ds_config(**settings)["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(ValueError, match="parallel.zero_stage=4 must be 1, 2 or 3"):
        ds_config(**settings | {"zero_stage": 4})
    with pytest.raises(ValueError, match="parallel.offload_params=true needs parallel.zero"):
        ds_config(**settings | {"offload_params": True})
    with pytest.raises(ValueError, match="recipe.batch_size=5 .* not divisible by the 2"):
        ds_config(**settings | {"batch_size": 5})
