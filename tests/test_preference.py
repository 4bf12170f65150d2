"""Preference tuning (``recipe=preference``): the closed forms of SimPO and Diffusion-DPO,
one draw of t and noise per pair, preference shards in both layouts with bad pairs
skipped and counted, the precomputed cache, the real CLI end to end, and every mesh equal
to one process."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from data.preference_shards import PreferenceLatentShards, PreferenceShards
from data.shards import ShardBatches, write_shard
from data.video import write_video
from models.preference import (
    beta_t,
    implicit_accuracy,
    per_sample_error,
    preference_loss,
    reward_margin,
)
from tests.conftest import compose_train, python_cmd
from tests.distributed import run_distributed
from tests.test_parallel_equivalence import BASE, full, relative_error
from tests.test_train_e2e import run, train_losses
from trainer.build import single_process
from trainer.config import ConfigError
from trainer.draws import StepDraws
from trainer.objective import caption_keep_mask, drop_captions, latent_flow_loss
from trainer.preference_task import PreferenceTask

BETA = 50.0
MODEL = [o for o in BASE if not o.startswith(("data.", "recipe."))]
# the equivalence tests' tiny DiT on pairs of 3 x 12 x 4 clips: 9 tokens per side, so cp=2
# pads and tp's sequence shards are uneven
# AdamW's eps 1e-6, not 1e-8: at step 1 the policy equals the reference, DPO's gradient is
# a difference of nearly equal terms, and Adam would scale elements that are rounding noise
# (|g| << 1e-6) to full lr-sized steps whose sign depends on the mesh's reduction order
# (measured: 9.9e-5 relative error in a weight at tp2 x cp2 with 1e-8).
PAIRS = [*MODEL, "data=preference", "data.shards=unused.tar", "data.sizes=[[12,4]]",
         "data.durations=[3]", "data.batch_sizes=[4]", "data.image_batch_size=4",
         "data.fps=8", "recipe=preference", "recipe.batch_size=4", "recipe.warmup_steps=2",
         "recipe.lr=1e-3", "recipe.grad_clip=0.5", f"recipe.beta={BETA}",
         "recipe.caption_dropout=0.25", "recipe.eps=1e-6"]
CAPTIONS = ["a red square moving left", "a blue circle", "", "a green triangle moving up"]
CPU = torch.device("cpu")


def pair_batch(seed: int = 0) -> dict:
    data = torch.Generator().manual_seed(seed)
    win, lose = (torch.rand((4, 3, 3, 12, 4), generator=data) * 2 - 1 for _ in range(2))
    return {"video_win": win, "video_lose": lose, "caption": list(CAPTIONS)}


def init_file(tmp_path) -> str:
    """A model to start from and refer to: the fresh init plus a little noise, so that no
    layer is zero (adaLN-zero) and velocity errors stay O(1)."""
    from trainer.build import build_model

    path = tmp_path / "init.safetensors"
    if not path.exists():
        model = build_model(compose_train(PAIRS), single_process(CPU))
        noise = torch.Generator().manual_seed(5)
        save_file({name: value + 0.05 * torch.randn(value.shape, generator=noise)
                   for name, value in model.state_dict().items()}, str(path))
    return str(path)


def task_and_model(overrides: list[str]) -> tuple[PreferenceTask, nn.Module]:
    """The task and its policy, loaded from trainer.init_from like trainer.train does."""
    from trainer.init_from import initialise_from

    cfg = compose_train(PAIRS + overrides)
    task = PreferenceTask(cfg, single_process(CPU))
    model = task.build_model()
    initialise_from(cfg, model, None, is_main=False)
    return task, model


# ------------------------------------------------------------------ closed forms

def test_dpo_is_log2_at_the_reference_and_its_gradient_lowers_the_winners_error(tmp_path):
    task, model = task_and_model([f"trainer.init_from={init_file(tmp_path)}",
                                  "recipe.loss=dpo"])
    batch = pair_batch()
    loss, metrics = task.loss(model, batch, StepDraws(3, 1), slice(0, 4), 4, 1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)  # policy = reference
    assert metrics["implicit_accuracy"] == 0.5 and metrics["reward_margin"] == 0
    assert torch.equal(metrics["error_win"], metrics["reference_error_win"])
    loss.backward()
    reference = task.reference
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    frozen = {name: value.clone() for name, value in reference.state_dict().items()}
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.cat([p.grad.flatten() for p in params]).norm()
    with torch.no_grad():  # a small step along −grad
        for param in params:
            param -= 1e-4 * param.grad / norm
    after, moved = task.loss(model, batch, StepDraws(3, 1), slice(0, 4), 4, 1)
    gap_before = metrics["error_win"] - metrics["error_lose"]
    gap_after = moved["error_win"] - moved["error_lose"]
    assert gap_after < gap_before  # the winner's error fell relative to the loser's
    assert after < loss and moved["reward_margin"] > 0
    assert moved["implicit_accuracy"] > 0.5
    assert torch.equal(moved["reference_error_win"], metrics["reference_error_win"])
    assert all(torch.equal(value, frozen[name])
               for name, value in reference.state_dict().items())


def linear_errors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample errors of a linear velocity model on 3 fixed pairs."""
    data = torch.Generator().manual_seed(4)
    x, target = (torch.randn((6, 5), generator=data, dtype=weight.dtype) for _ in range(2))
    velocity = x @ weight
    both = per_sample_error(velocity, target)
    return both[:3], both[3:]


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_simpo_as_beta_goes_to_zero_follows_the_derived_gradient(gamma):
    """models/preference.py: ∂L/∂θ = β·σ(γ)·∂ mean(e_w − e_l)/∂θ + O(β²), so the gradient
    over β tends to σ(γ)·∂ mean(e_w − e_l)/∂θ, and a step along −∂L/∂θ lowers e_w − e_l."""
    weight = torch.randn((5, 5), generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).requires_grad_()
    gap = torch.autograd.grad(torch.sub(*linear_errors(weight)).mean(), weight)[0]
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    misses = []  # relative distance of grad / β from the limit: O(β), so 100x smaller per step
    for beta in (1e-3, 1e-5, 1e-7):
        error_win, error_lose = linear_errors(weight)
        loss = preference_loss(reward_margin(error_win, error_lose, beta_t(beta, t)),
                               gamma)
        grad = torch.autograd.grad(loss, weight)[0] / beta
        misses.append(relative_error(grad, torch.sigmoid(torch.tensor(gamma)) * gap))
    assert loss.item() == pytest.approx(math.log1p(math.exp(gamma)), abs=1e-5)
    assert misses[2] < 1e-5 and misses[1] < 0.02 * misses[0] and misses[2] < 0.02 * misses[1]
    for beta in (1e-3, 10.0):  # the sign holds at any β: σ(−d) > 0
        error_win, error_lose = linear_errors(weight)
        loss = preference_loss(reward_margin(error_win, error_lose, beta_t(beta, t)),
                               gamma)
        grad = torch.autograd.grad(loss, weight)[0]
        assert (grad * gap).sum() > 0
        stepped = weight.detach() - 1e-3 * grad / grad.norm()
        assert torch.sub(*linear_errors(stepped)).mean() < torch.sub(*linear_errors(weight)).mean()


def test_eps_schedule_is_the_noise_error_and_ties_count_half():
    """β·t² on velocity errors is the constant-β loss on noise errors (x̂0 − x0 =
    −t(v̂ − v)), and an exact tie is half right."""
    generator = torch.Generator().manual_seed(2)
    v_hat, v = torch.randn((4, 3, 2, 2, 2), generator=generator), torch.randn((4, 3, 2, 2, 2))
    t = torch.rand(2, generator=generator)
    tt = torch.cat([t, t]).reshape(-1, 1, 1, 1, 1)
    noise_win, noise_lose = per_sample_error(-tt * v_hat, -tt * v).split(2)
    error_win, error_lose = per_sample_error(v_hat, v).split(2)
    torch.testing.assert_close(reward_margin(error_win, error_lose, beta_t(3.0, t, "eps")),
                               reward_margin(noise_win, noise_lose, beta_t(3.0, t)))
    assert implicit_accuracy(torch.tensor([1.0, 0.0, -2.0, 0.0])) == 0.5


class Recorder(nn.Module):
    """A stand-in model: predicts x_t and keeps what it was given."""

    def forward(self, x_t, t, text):
        self.x_t, self.t, self.text = x_t, t, text
        return x_t * 0.5


def test_both_sides_of_a_pair_get_the_same_t_noise_and_caption_and_the_sft_draws(tmp_path):
    task, _ = task_and_model(["recipe.caption_dropout=0.5"])
    recorder, batch, flow = Recorder(), pair_batch(), task.flow
    batch["caption"] = [f"caption {i}" for i in range(4)]
    # a step whose draws drop some captions and keep others
    step = next(s for s in range(1, 50)
                if 0 < caption_keep_mask(StepDraws(5, s), slice(4, 8), 0.5).sum() < 4)
    keep = caption_keep_mask(StepDraws(5, step), slice(4, 8), 0.5)
    task.loss(recorder, batch, StepDraws(5, step), slice(4, 8), 8, step)
    sides = list(recorder.text)
    x1 = task.autoencoder.encode(torch.cat([batch["video_win"], batch["video_lose"]]))
    t, x_t = recorder.t, recorder.x_t
    assert torch.equal(t[:4], t[4:])
    tt = t.reshape(-1, 1, 1, 1, 1)
    x0 = (x_t - tt * x1) / (1 - (1 - flow.sigma_min) * tt)
    torch.testing.assert_close(x0[:4], x0[4:], rtol=0, atol=1e-5)
    assert sides[:4] == sides[4:] == drop_captions(batch["caption"], keep)
    # the preferred side's draws are those plain training gives the same samples
    latent_flow_loss(recorder, flow, x1[:4], batch["caption"], StepDraws(5, step), 0.5,
                     rows=slice(4, 8))
    assert torch.equal(recorder.t, t[:4]) and torch.equal(recorder.x_t, x_t[:4])


# ------------------------------------------------------------------ shards

def flat_clip(tmp_path, name, colour, frames=8, height=16, width=16) -> bytes:
    """mp4 bytes of a flat ``colour`` clip at 8 fps."""
    array = np.broadcast_to(np.array(colour, np.uint8), (frames, height, width, 3))
    path = tmp_path / f"{name}.mp4"
    write_video(path, np.ascontiguousarray(array), 8.0)
    return path.read_bytes()


def jpeg(colour, height=16, width=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), tuple(colour)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


RED, BLUE = (220, 20, 20), (20, 20, 220)


def pair_samples(tmp_path) -> list[dict]:
    """Good pairs in both layouts (Pick-a-Pic labels either way) and one of each bad kind."""
    red, blue = flat_clip(tmp_path, "red", RED), flat_clip(tmp_path, "blue", BLUE)
    wide_blue = flat_clip(tmp_path, "wide", BLUE, height=16, width=32)
    picks = {"jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE)}
    return [
        {"__key__": "ours", "win.mp4": red, "lose.mp4": wide_blue, "txt": "a red clip"},
        {"__key__": "pick_first", **picks, "json": {"caption": "red", "label_0": 1,
                                                    "label_1": 0}},
        {"__key__": "pick_second", **picks, "json": {"caption": "blue", "label_0": 0.0,
                                                     "label_1": 1.0}},
        {"__key__": "missing", "win.mp4": red, "txt": "no loser"},
        {"__key__": "pick_missing", "jpg_1": jpeg(BLUE), "json": {"caption": "one",
                                                                  "label_1": 1}},
        {"__key__": "same", "win.mp4": red, "lose.mp4": red, "txt": "twice"},
        {"__key__": "tie", **picks, "json": {"caption": "tie", "label_0": 0.5,
                                             "label_1": 0.5}},
        {"__key__": "unlabelled", **picks, "txt": "no labels"},
        {"__key__": "mislabelled", **picks, "json": {"caption": "x", "label_0": 1,
                                                     "label_1": 1}},
        {"__key__": "reversed", "win.mp4": blue, "lose.mp4": red, "txt": "a blue clip"},
    ]


GRID = ["data.sizes=[[16,16]]", "data.durations=[4]", "data.fps=8", "data.num_workers=0",
        "model=dit_tiny"]
SKIPS = {"missing_side": 2, "identical_sides": 1, "tie": 1, "missing_label": 1,
         "bad_label": 1}


def mean_colour(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> its mean RGB in [0, 255]."""
    return (video.mean(dim=(1, 2, 3)) + 1) * 127.5


def test_shards_in_both_layouts_pick_the_preferred_side_and_count_bad_pairs(tmp_path):
    write_shard(tmp_path / "pairs.tar", pair_samples(tmp_path))
    cfg = compose_train(PAIRS + GRID + [f"data.shards={tmp_path}/pairs.tar",
                                        "data.batch_sizes=[1]", "data.image_batch_size=1"])
    reader = PreferenceShards(cfg.data.shards, cfg.data.grid(), cfg.data.fps, epochs=1)
    loader = ShardBatches(reader)
    pairs = {batch["key"][0]: batch for batch in loader}
    assert loader.skipped == SKIPS
    assert sorted(pairs) == ["ours", "pick_first", "pick_second", "reversed"]
    for key, winner in (("ours", RED), ("pick_first", RED), ("pick_second", BLUE),
                        ("reversed", BLUE)):
        batch = pairs[key]
        # the rejected side is decoded into the preferred side's bucket, whatever its size
        assert batch["video_win"].shape == batch["video_lose"].shape
        win, lose = mean_colour(batch["video_win"][0]), mean_colour(batch["video_lose"][0])
        loser = BLUE if winner == RED else RED
        assert torch.allclose(win, torch.tensor(winner, dtype=torch.float), atol=12), key
        assert torch.allclose(lose, torch.tensor(loser, dtype=torch.float), atol=12), key
    assert pairs["ours"]["video_win"].shape == (1, 3, 4, 16, 16)
    assert pairs["pick_first"]["video_win"].shape == (1, 3, 1, 16, 16)  # images: T = 1
    assert pairs["ours"]["caption"] == ["a red clip FPS-8"]
    assert pairs["pick_first"]["caption"] == ["red"]


def test_precomputed_pairs_give_the_raw_pairs_loss(tmp_path):
    from trainer.precompute import precompute

    write_shard(tmp_path / "raw" / "000000.tar", pair_samples(tmp_path))
    raw = PAIRS + GRID + ["data.batch_sizes=[2]", "data.image_batch_size=2",
                          "text.encoders.byte.trainable=false", "recipe.caption_dropout=0.5"]
    counts = precompute(compose_train(raw + [f"data.shards={tmp_path}/raw/000000.tar"]),
                        str(tmp_path / "cache"), batch=2)
    assert counts == {"shards_written": 1, "samples_written": 4, **SKIPS}
    cached = [o.replace("data=preference", "data=preference_latents") for o in raw]
    cfg = compose_train(cached + [f"data.shards={tmp_path}/cache/000000.tar"])
    loader = ShardBatches(PreferenceLatentShards(cfg.data.shards, cfg.data.grid(),
                                                 cfg.data.fps, epochs=1))
    cache_batches = {tuple(b["key"]): b for b in loader}
    raw_cfg = compose_train(raw + [f"data.shards={tmp_path}/raw/000000.tar"])
    raw_loader = ShardBatches(PreferenceShards(raw_cfg.data.shards, raw_cfg.data.grid(),
                                               raw_cfg.data.fps, epochs=1))
    raw_batches = {tuple(b["key"]): b for b in raw_loader}
    assert cache_batches.keys() == raw_batches.keys() == {("ours", "reversed"),
                                                          ("pick_first", "pick_second")}
    raw_task, model = task_and_model(raw[len(PAIRS):] + [
        f"data.shards={tmp_path}/raw/000000.tar"])
    cache_task = PreferenceTask(cfg, single_process(CPU))
    for keys, batch in raw_batches.items():
        assert torch.equal(cache_batches[keys]["latent_win"],
                           raw_task.autoencoder.encode(batch["video_win"]))
        ours = raw_task.loss(model, batch, StepDraws(1, 1), slice(0, 2), 2, 1)
        theirs = cache_task.loss(model, cache_batches[keys], StepDraws(1, 1), slice(0, 2), 2, 1)
        torch.testing.assert_close(theirs[0], ours[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(theirs[1]["error_lose"], ours[1]["error_lose"],
                                   rtol=1e-5, atol=0)


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="recipe=preference trains on preference pairs"):
        PreferenceTask(compose_train([*BASE, "recipe=preference"]), single_process(CPU))
    with pytest.raises(ConfigError, match="train them with recipe=preference"):
        from trainer.tasks import build_task
        build_task(compose_train([p for p in PAIRS if not p.startswith(("recipe=", "recipe.beta"))]
                                 ), single_process(CPU))
    with pytest.raises(ConfigError, match="trainer.init_from, which is not set"):
        task_and_model(["recipe.loss=dpo"])
    with pytest.raises(ConfigError, match=r"recipe.margin=0.5 is SimPO's"):
        compose_train(PAIRS + ["recipe.loss=dpo", "recipe.margin=0.5"])
    with pytest.raises(ConfigError, match=r"recipe.pixel_loss.weight=8.0 adds SimPO's"):
        compose_train(PAIRS + ["recipe.loss=dpo", "recipe.pixel_loss.weight=8"])
    with pytest.raises(ConfigError, match=r"recipe.beta=0.0 must be a finite number > 0"):
        compose_train(PAIRS + ["recipe.beta=0"])
    with pytest.raises(ConfigError, match="parallel.engine=deepspeed"):
        task_and_model(["recipe.loss=dpo", f"trainer.init_from={init_file(tmp_path)}",
                        "parallel.engine=deepspeed"])


# ------------------------------------------------------------------ the real CLI

@pytest.mark.slow
def test_dpo_run_through_the_cli_logs_preference_metrics_and_freezes_the_reference(tmp_path):
    small = ["model.depth=2", "model.width=64", "model.heads=4", "model.ffn_dim=128",
             "text.encoders.byte.dim=64", "text.encoders.byte.depth=1",
             "text.encoders.byte.ffn_dim=128", "trainer.progress=false"]
    pretrained = tmp_path / "pretrained"
    run(python_cmd("trainer.train", f"hydra.run.dir={pretrained}", "experiment=t2v_tiny",
                   *small, "model=dit_tiny", "data.frames=4", "data.height=16", "data.width=16",
                   "recipe.batch_size=4", "trainer.max_steps=2", "trainer.ckpt_every=2",
                   "trainer.val_every=2", "trainer.val_batches=1", "data.val_samples=4",
                   "data.judge_prompts=0", "trainer.wandb.mode=disabled",
                   "trainer.sample_prompts=[]"))
    for index in range(2):
        write_shard(tmp_path / "pairs" / f"{index:06d}.tar", pair_samples(tmp_path))
    run_dir = tmp_path / "dpo"
    result = run(python_cmd(
        "trainer.train", f"hydra.run.dir={run_dir}", "experiment=preference_tiny", *small,
        *GRID, f"data.shards='{tmp_path}/pairs/{{000000..000001}}.tar'",
        f"data.val_shards={tmp_path}/pairs/000000.tar", "data.batch_sizes=[2]",
        "data.image_batch_size=2", "recipe.batch_size=2", "recipe.loss=dpo",
        f"trainer.init_from={pretrained}", "trainer.max_steps=4", "trainer.log_every=1",
        "trainer.val_every=4", "trainer.ckpt_every=4", "trainer.sample_every=4",
        "trainer.sample_steps=2", "trainer.sample_prompts=[a red clip FPS-8]"))
    assert "reference model: a frozen copy" in result.stdout
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    for record in steps:
        for key in ("implicit_accuracy", "reward_margin", "error_win", "error_lose",
                    "reference_error_win", "reference_error_lose"):
            assert math.isfinite(record[key]), (key, record)
    assert max(r.get(f"skipped_{reason}", 0) for r in steps for reason in SKIPS) >= 1
    assert {reason for r in steps for reason in SKIPS if r.get(f"skipped_{reason}")} \
        == set(SKIPS)
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [4]
    assert 0 <= val[0]["implicit_accuracy"] <= 1 and "implicit_accuracy_ema" in val[0]
    assert list((run_dir / "samples" / "step_00000004").glob("*.mp4"))
    # the wandb run (offline) carries the preference metrics
    history = b"".join(p.read_bytes() for p in run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    for key in (b"train/implicit_accuracy", b"train/reward_margin",
                b"train/reference_error_lose", b"val/implicit_accuracy"):
        assert key in history
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]


# ------------------------------------------------------------------ meshes

STEPS = 3


def run_pair_steps(overrides: list[str]) -> dict:
    """The real train_step for STEPS steps on fixed pairs: losses, metrics, the first
    step's gradients, the final weights and EMA, and what the reference holds."""
    from parallel.engine import NativeEngine
    from trainer.ema import EMA
    from trainer.init_from import initialise_from
    from trainer.optim import build_optimizer
    from trainer.train import start_parallel, train_step

    cfg = compose_train(PAIRS + overrides)
    ctx = start_parallel(cfg)
    task = PreferenceTask(cfg, ctx)
    model = task.build_model()
    initialise_from(cfg, model, None, ctx.is_main)
    engine = NativeEngine(model, lambda p: build_optimizer(p, cfg.recipe, 10, fused=True))
    ema = EMA(engine.ema_tensors(), 0.5)
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    losses, metrics, grads = [], [], {}
    for step in range(1, STEPS + 1):
        batch = pair_batch(step)
        batch = {"video_win": batch["video_win"][rows], "video_lose": batch["video_lose"][rows],
                 "caption": batch["caption"][rows]}
        result = {name: float(value)
                  for name, value in train_step(cfg, step, batch, engine, task, ema, ctx).items()}
        losses.append(result.pop("loss"))
        metrics.append({k: v for k, v in result.items() if k not in ("grad_norm", "lr")})
        if step == 1:
            grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    reference = task.reference
    optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    return {"losses": losses, "metrics": metrics, "grads": grads,
            "weights": {n: full(p) for n, p in model.named_parameters()},
            "ema": {n: full(t) for n, t in ema.shadow.items()},
            "reference": None if reference is None else
            {n: full(p) for n, p in reference.named_parameters()},
            "reference_frozen": reference is None or all(
                not p.requires_grad and p.grad is None and id(p) not in optimized
                for p in reference.parameters()),
            "sharded_like_policy": reference is None or all(
                type(p) is type(q) and getattr(p, "placements", None)
                == getattr(q, "placements", None) and p.shape == q.shape
                for p, q in zip(reference.parameters(), model.parameters(), strict=True))}


LOSSES = {"dpo": ["recipe.loss=dpo"],
          "simpo_pixel": ["recipe.margin=0.5", "recipe.pixel_loss.weight=8",
                          "recipe.pixel_loss.frames=2", "recipe.pixel_loss.crop=[8,4]",
                          "recipe.beta_schedule=eps"]}
MESHES = {"fsdp2": (["parallel.dp_shard=2"], 2), "tp2_cp2": (["parallel.tp=2", "parallel.cp=2"], 4)}


@pytest.fixture(scope="module")
def init_path(tmp_path_factory):
    return init_file(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def one_process(init_path):
    return {name: run_pair_steps([*extra, f"trainer.init_from={init_path}"])
            for name, extra in LOSSES.items()}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_preference_loss_on_a_mesh_matches_one_process(loss, mesh, init_path, one_process):
    """Loss of 3 steps, every metric, every gathered gradient, weights, EMA and the frozen
    reference: relative error <= 1e-5."""
    expected = one_process[loss]
    assert expected["reference_frozen"]
    overrides, world = MESHES[mesh]
    results = run_distributed(run_pair_steps, world,
                              [*LOSSES[loss], f"trainer.init_from={init_path}", *overrides])
    for rank, result in enumerate(results):
        where = f"{loss} {mesh} rank {rank}"
        assert result["reference_frozen"] and result["sharded_like_policy"], where
        for step, (got, want) in enumerate(zip(result["losses"], expected["losses"],
                                               strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), f"{where} step {step + 1}"
        for step, (got, want) in enumerate(zip(result["metrics"], expected["metrics"],
                                               strict=True)):
            assert got.keys() == want.keys(), where
            # the margin is β times a difference of O(1) errors: fp32 rounding of those
            # errors, not of the margin, sets its precision
            scales = {"reward_margin": BETA * (want["error_win"] + want["error_lose"])}
            for key, value in want.items():
                if key == "implicit_accuracy" and step == 0 and loss == "dpo":
                    continue  # policy = reference: every margin is 0 up to rounding, a tie
                assert abs(got[key] - value) <= 1e-5 * scales.get(key, abs(value)), (where, key)
        assert result["grads"].keys() == expected["grads"].keys(), where
        for kind in ("grads", "weights", "ema", "reference"):
            for name, value in (expected[kind] or {}).items():
                error = relative_error(result[kind][name], value)
                assert error <= 1e-5, f"{where} {kind} {name}: relative error {error:.2e}"
