"""Training the TAE with the trainer: FSDP equivalence, the CLI end to end (validation
PSNR/SSIM, reconstruction videos in wandb, resume, export) and the DiT on its latents."""

import json
import subprocess

import pytest
import torch
from torch.distributed.tensor import DTensor

from data.video import read_video
from tests.conftest import ROOT, compose_train, python_cmd
from tests.distributed import run_distributed
from trainer.config import ConfigError

SMALL = ["experiment=tae_tiny", "data.frames=8", "data.height=16", "data.width=16",
         "recipe.batch_size=4", "recipe.discriminator=true", "recipe.disc_channels=8",
         "recipe.disc_layers=2", "recipe.loss.disc_start=2", "recipe.loss.opl_weight=10",
         "trainer.wandb.mode=disabled"]
STEPS = 3


def full(tensor):
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_steps(overrides: list[str]) -> dict:
    """STEPS real train steps on fixed videos (the GAN joins at step 2)."""
    from parallel.engine import NativeEngine
    from trainer.ema import EMA
    from trainer.optim import build_optimizer
    from trainer.tae_task import AutoencoderTask
    from trainer.train import start_parallel, train_step

    # seed 1: with seed 0's draws one discriminator pre-activation at step 3 sits within
    # fp32 summation noise of its LeakyReLU kink, and the adaptive weight (a ratio of
    # gradient norms through it) then differs by ~5e-5 between summation orders
    cfg = compose_train(SMALL + ["trainer.seed=1"] + overrides)
    ctx = start_parallel(cfg)
    task = AutoencoderTask(cfg, ctx)
    model = task.build_model()
    engine = NativeEngine(model, lambda p: build_optimizer(p, cfg.recipe, 10, fused=True))
    ema = EMA(engine.ema_tensors(), 0.5)
    data = torch.Generator().manual_seed(3)
    videos = [torch.rand((4, 3, 8, 16, 16), generator=data) * 2 - 1 for _ in range(STEPS)]
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    metrics, grads = [], {}
    for step in range(1, STEPS + 1):
        batch = {"video": videos[step - 1][rows], "caption": ["c"] * local}
        values = train_step(cfg, step, batch, engine, task, ema, ctx)
        metrics.append({name: float(value) for name, value in values.items()})
        if step == STEPS:
            grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return {"metrics": metrics, "grads": grads,
            "weights": {n: full(p) for n, p in model.named_parameters()},
            "ema": {n: full(t) for n, t in ema.shadow.items()},
            "val": task.validate(model, [{"video": videos[0], "caption": ["c"] * 4}])}


def close(a, b) -> bool:
    """Within 1e-5 relative, or 1e-6 absolute. Gradients agree to ~3e-6; but the
    zero-initialised temporal convs are only Adam steps (~1e-4) after three updates, and
    Adam turns a gradient element near zero into a full step of either sign, so
    summation-order noise there moves a weight by up to ~6e-7 (under 1% of one step)."""
    return (a - b).norm() <= 1e-5 * b.norm() or (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize("overrides,world", [(["parallel.dp_shard=2"], 2),
                                             (["parallel.dp_replicate=2",
                                               "parallel.dp_shard=1"], 2)])
def test_fsdp_tae_with_gan_matches_one_process(overrides, world):
    reference = run_steps([])
    assert "adaptive_weight" in reference["metrics"][-1]  # the GAN path really ran
    for rank, result in enumerate(run_distributed(run_steps, world, overrides)):
        for step, (got, want) in enumerate(zip(result["metrics"], reference["metrics"],
                                                   strict=True)):
            for name in ("loss", "l1", "kl", "opl", "grad_norm", "adaptive_weight", "disc"):
                if name in want:
                    assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), \
                        (rank, step + 1, name)
        assert result["grads"].keys() == reference["grads"].keys()
        assert any(n.startswith("discriminator.") for n in result["grads"])
        for group in ("grads", "weights", "ema"):
            for name, value in reference[group].items():
                assert close(result[group][name], value), (rank, group, name)
        assert result["val"] == pytest.approx(reference["val"], rel=1e-5)


def test_tae_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="parallel.tp=2"):
        compose_train(SMALL + ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="recipe=tae_adamw"):
        compose_train(["experiment=t2v_tiny", "task=tae", "autoencoder=tae_tiny"])
    with pytest.raises(ConfigError, match="autoencoder.checkpoint is not set"):
        compose_train(["experiment=t2v_tiny", "autoencoder=tae_tiny"])
    with pytest.raises(ConfigError, match="is not a file"):
        compose_train(["experiment=t2v_tiny", "autoencoder=tae_tiny",
                       f"autoencoder.checkpoint={tmp_path / 'nope.safetensors'}"])


def run(cmd, timeout=400):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def records(run_dir, kind):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == kind]


@pytest.mark.slow
def test_tae_cli_trains_validates_resumes_and_feeds_the_dit(tmp_path):
    tae_dir, cut_dir = tmp_path / "tae", tmp_path / "cut"
    common = ["experiment=tae_tiny", "data.val_samples=8", "recipe.batch_size=4",
              "trainer.val_every=10", "trainer.sample_every=40", "trainer.val_batches=2",
              "trainer.ckpt_every=20", "trainer.progress=false"]
    run(python_cmd("trainer.train", f"hydra.run.dir={tae_dir}", *common,
                   "trainer.max_steps=40"))
    val = records(tae_dir, "val")
    assert [r["step"] for r in val] == [10, 20, 30, 40]
    assert val[-1]["psnr"] > val[0]["psnr"] + 1.0 and val[-1]["ssim"] > val[0]["ssim"]
    videos = sorted((tae_dir / "reconstructions" / "step_00000040").glob("*.mp4"))
    assert len(videos) == 4
    frames, _ = read_video(videos[0])
    assert tuple(frames.shape) == (8, 32, 64, 3)  # input | reconstruction, side by side
    history = next((tae_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"val/psnr" in history and b"val/ssim" in history and b"reconstructions" in history

    # stopped at 20 and resumed: every later step equal to the uninterrupted run
    run(python_cmd("trainer.train", f"hydra.run.dir={cut_dir}", *common,
                   "trainer.max_steps=20", "trainer.wandb.mode=disabled"))
    run(python_cmd("trainer.train", f"hydra.run.dir={cut_dir}", *common,
                   "trainer.max_steps=40", "trainer.wandb.mode=disabled"))
    losses = {r["step"]: r["loss"] for r in records(cut_dir, "train")}
    assert losses == {r["step"]: r["loss"] for r in records(tae_dir, "train")}

    # export, then a DiT trains on the frozen TAE's latents and samples through it
    weights = tmp_path / "tae.safetensors"
    run(python_cmd("trainer.export", f"checkpoint={tae_dir}", f"output={weights}"))
    dit_dir = tmp_path / "dit"
    run(python_cmd("trainer.train", f"hydra.run.dir={dit_dir}", "experiment=t2v_tiny",
                   "autoencoder=tae_tiny", f"autoencoder.checkpoint={weights}",
                   "model=dit_tiny", "model.in_channels=8",
                   "model.depth=2", "model.width=64", "model.heads=4", "model.ffn_dim=128",
                   "recipe.batch_size=4", "trainer.max_steps=3", "trainer.sample_steps=2",
                   "trainer.val_batches=1", "trainer.progress=false",
                   "trainer.wandb.mode=disabled", "trainer.sample_prompts=[a red square]"))
    train = records(dit_dir, "train")
    assert len(train) == 3 and all(r["loss"] == r["loss"] for r in train)
    sample = next((dit_dir / "samples" / "step_00000003").glob("*.mp4"))
    frames, _ = read_video(sample)
    assert tuple(frames.shape) == (8, 32, 32, 3)
