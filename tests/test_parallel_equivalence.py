"""Every mesh computes what one process computes (arXiv 2410.13720 §6).

Each case runs the real training step (``trainer.train.train_step``: loss, backward,
mesh-aware clipping, AdamW, EMA, LR warmup) in gloo processes on CPU and compares with
the same code in one process: the forward output, the loss of every step, every
parameter's full gradient after the first step (relative error <= 1e-5 in fp32) and every
full weight after three steps (<= 3e-5, see WEIGHT_TOLERANCE). The patch grid has 9
tokens, so cp=2 needs padding and tp's sequence shards are uneven.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.conftest import compose_train
from tests.distributed import run_distributed

BASE = ["experiment=t2v_tiny", "model.width=32", "model.depth=2", "model.heads=4",
        "model.ffn_dim=48", "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
        "text.encoders.byte.ffn_dim=48", "text.encoders.byte.trainable=true",
        "model=dit_tiny", "data.frames=3", "data.height=12", "data.width=4", "recipe.batch_size=4",
        "recipe.warmup_steps=2", "recipe.lr=1e-3", "recipe.grad_clip=0.5",
        "recipe.caption_dropout=0.25", "trainer.wandb.mode=disabled"]
# Weights after STEPS AdamW steps. Zero-initialised parameters (adaLN-zero, the
# cross-attention output, the text projection's bias behind it) get their first nonzero
# gradient at step 2, tiny, and Adam divides it by its own magnitude: the rounding of the
# mesh's reduction order reaches the update almost undamped (measured up to 1.7e-5 at
# fsdp2 x cp2). Outputs, losses and gradients stay at 1e-5.
WEIGHT_TOLERANCE = 3e-5
CAPTIONS = ["a red square moving left", "a blue circle", "", "a green triangle moving up"]
STEPS = 3


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_steps(overrides: list[str]) -> dict:
    """Train STEPS steps on fixed data; return outputs, losses, grads, weights, EMA."""
    from parallel.engine import NativeEngine
    from trainer.ema import EMA
    from trainer.optim import build_optimizer
    from trainer.t2v_task import TextToVideoTask
    from trainer.train import start_parallel, train_step

    cfg = compose_train(BASE + overrides)
    ctx = start_parallel(cfg)
    task = TextToVideoTask(cfg, ctx)
    model = task.build_model()
    engine = NativeEngine(model, lambda p: build_optimizer(p, cfg.recipe, 10, fused=True))
    ema = EMA(engine.ema_tensors(), 0.5)
    data = torch.Generator().manual_seed(7)
    shape = (cfg.recipe.batch_size, 3, cfg.data.frames, cfg.data.height, cfg.data.width)
    videos = [torch.rand(shape, generator=data) * 2 - 1 for _ in range(STEPS)]
    latent = task.autoencoder.encode(videos[0])
    with torch.no_grad():
        output = engine.module(latent, torch.full((shape[0],), 0.3), CAPTIONS)
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    losses, grads = [], {}
    for step in range(1, STEPS + 1):
        batch = {"video": videos[step - 1][rows], "caption": CAPTIONS[rows]}
        losses.append(train_step(cfg, step, batch, engine, task, ema, ctx)["loss"].item())
        if step == 1:
            grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    weights = {n: full(p) for n, p in model.named_parameters()}
    averaged = {n: full(t) for n, t in ema.shadow.items()}
    return {"output": output, "losses": losses, "grads": grads, "weights": weights,
            "ema": averaged}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def references():
    """One process's results per model variant (a case's ``model.*`` overrides), run once."""
    cache: dict[tuple[str, ...], dict] = {}

    def of(overrides: list[str]) -> dict:
        model = tuple(o for o in overrides if o.startswith("model."))
        if model not in cache:
            cache[model] = run_steps(list(model))
        return cache[model]
    return of


CASES = {
    "tp2": ["parallel.tp=2"],
    "cp2_allgather_kv": ["parallel.cp=2", "parallel.cp_mode=allgather_kv"],
    "cp2_ulysses": ["parallel.cp=2", "parallel.cp_mode=ulysses"],
    "cp2_ring": ["parallel.cp=2", "parallel.cp_mode=ring"],
    "tp2_cp2_allgather_kv": ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=allgather_kv"],
    "tp2_cp2_ulysses": ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ulysses"],
    "tp2_cp2_ring": ["parallel.tp=2", "parallel.cp=2", "parallel.cp_mode=ring"],
    "fsdp2": ["parallel.dp_shard=2"],
    "fsdp2_tp2": ["parallel.dp_shard=2", "parallel.tp=2"],
    "fsdp2_cp2": ["parallel.dp_shard=2", "parallel.cp=2", "parallel.cp_mode=ring"],
    "hsdp_2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "replicate2": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    # the memory/speed switches compose with the mesh
    "fsdp2_tp2_checkpointed": ["parallel.dp_shard=2", "parallel.tp=2",
                               "parallel.activation_checkpointing=full"],
    "tp2_compiled_every_k": ["parallel.tp=2", "parallel.compile=true",
                             "parallel.activation_checkpointing=every_k"],
    # model options that add parameters get their own one-process reference
    "fsdp2_tp2_text_modulation": ["parallel.dp_shard=2", "parallel.tp=2",
                                  "model.text_modulation=true"],
}
WORLD = {"replicate2": 2, "tp2": 2, "cp2_allgather_kv": 2, "cp2_ulysses": 2, "cp2_ring": 2,
         "fsdp2": 2, "tp2_compiled_every_k": 2}


@pytest.mark.parametrize("case", list(CASES))
def test_mesh_matches_one_process(case, references):
    reference = references(CASES[case])
    world = WORLD.get(case, 4)
    results = run_distributed(run_steps, world, CASES[case])
    for rank, result in enumerate(results):
        where = f"{case} rank {rank}"
        assert relative_error(result["output"], reference["output"]) <= 1e-5, where
        for step, (loss, expected) in enumerate(
                zip(result["losses"], reference["losses"], strict=True)):
            assert abs(loss - expected) <= 1e-5 * abs(expected), f"{where} step {step + 1}"
        assert result["grads"].keys() == reference["grads"].keys(), where
        for kind, tolerance in (("grads", 1e-5), ("weights", WEIGHT_TOLERANCE),
                                ("ema", WEIGHT_TOLERANCE)):
            for name, expected in reference[kind].items():
                error = relative_error(result[kind][name], expected)
                assert error <= tolerance, f"{where} {kind} {name}: relative error {error:.2e}"


def test_fsdp2_bf16_params_with_fp32_reduction_stay_close(references):
    """Mixed precision is a switch: bf16 compute, fp32 gradient reduction and master
    weights; the losses stay within bf16 rounding of the fp32 run."""
    reference = references([])
    results = run_distributed(run_steps, 2, ["parallel.dp_shard=2", "parallel.param_dtype=bf16"])
    for result in results:
        for loss, expected in zip(result["losses"], reference["losses"], strict=True):
            assert abs(loss - expected) <= 1e-2 * abs(expected)
        assert all(w.dtype == torch.float32 for w in result["weights"].values())
