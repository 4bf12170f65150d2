"""Few-step distillation (``task=distill``): the shifted reconstruction loss in closed
form, backward distillation's inputs from the student's own trajectory (never from the
data), config errors, a mesh equal to one process, and the real CLI: SIGKILL and resume
bitwise, export, and ``trainer.sample steps=3`` on the student's own times."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import save_file

from data.video import read_video
from models.distill import (
    backward_inputs,
    reconstruction_loss,
    shifted_reconstruction_target,
    shifted_time,
    teacher_trajectory_target,
)
from models.flow import FlowMatching
from tests.conftest import ROOT, compose_train
from tests.distributed import run_distributed
from tests.test_parallel_equivalence import BASE, full, relative_error
from tests.test_train_e2e import QUIET, TINY, run, train_cmd, train_losses
from trainer.build import single_process
from trainer.config import ConfigError
from trainer.distill_config import student_sampling
from trainer.distill_task import DistillTask
from trainer.draws import StepDraws

CPU = torch.device("cpu")
DISTILL = [*(o for o in BASE if not o.startswith("recipe.caption_dropout")), "task=distill",
           "recipe=distill", "recipe.batch_size=4", "recipe.lr=1e-3", "recipe.warmup_steps=2",
           "recipe.grad_clip=0.5"]
CAPTIONS = ["a red square moving left", "a blue circle", "a green triangle moving up",
            "a yellow square"]


def init_file(directory, overrides: list[str] = DISTILL) -> str:
    """A teacher: the fresh init plus a little noise, so no layer is zero (adaLN-zero)."""
    from trainer.build import build_model

    path = directory / "teacher.safetensors"
    if not path.exists():
        model = build_model(compose_train(overrides), single_process(CPU))
        noise = torch.Generator().manual_seed(5)
        save_file({name: value + 0.05 * torch.randn(value.shape, generator=noise)
                   for name, value in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return init_file(tmp_path_factory.mktemp("teacher"))


def video_batch(seed: int) -> dict:
    data = torch.Generator().manual_seed(seed)
    return {"video": torch.rand((4, 3, 3, 12, 4), generator=data) * 2 - 1,
            "caption": list(CAPTIONS)}


# ------------------------------------------------------------------ the math


def test_shifted_reconstruction_target_and_loss_in_closed_form():
    """A teacher with zero velocity returns its input as the clean estimate, so the target
    is the student's estimate re-noised: x̂ + shift (1 - t) (e - x̂). A teacher that lands
    on c from anywhere gives a student already at c loss 0 and zero gradient."""
    flow, shift = FlowMatching(sigma_min=0.0), 0.75
    draw = torch.Generator().manual_seed(0)
    student = torch.randn((3, 2, 2, 4, 4), generator=draw).requires_grad_()
    noise = torch.randn((3, 2, 2, 4, 4), generator=draw)
    t = torch.tensor([0.0, 1 / 3, 2 / 3])
    assert torch.allclose(1 - shifted_time(t, shift), shift * (1 - t))

    target = shifted_reconstruction_target(lambda x, tau: torch.zeros_like(x), flow, student,
                                           noise, t, shift)
    gap = (shift * (1 - t)).view(-1, 1, 1, 1, 1)
    assert torch.allclose(target, student.detach() + gap * (noise - student.detach()), atol=1e-6)
    assert not target.requires_grad
    loss = reconstruction_loss(student, target)
    loss.backward()
    assert torch.allclose(loss, (gap * (noise - student.detach())).pow(2).mean())
    assert torch.allclose(student.grad, 2 * (student.detach() - target) / student.numel())

    c = torch.randn((3, 2, 2, 4, 4), generator=draw)

    def lands_on_c(x, tau):  # v with predicted_data(x, v, tau) = c
        return (c - x) / (1 - tau).view(-1, 1, 1, 1, 1)

    at_c = c.clone().requires_grad_()
    loss = reconstruction_loss(at_c, shifted_reconstruction_target(lands_on_c, flow, at_c,
                                                                   noise, t, shift))
    loss.backward()
    assert loss.item() < 1e-10 and at_c.grad.abs().max().item() < 1e-8
    away = (c + 0.1).requires_grad_()
    assert reconstruction_loss(away, shifted_reconstruction_target(
        lands_on_c, flow, away, noise, t, shift)).item() == pytest.approx(0.01, rel=1e-4)


def test_teacher_trajectory_target_is_the_teachers_euler_sample_from_each_state():
    """A teacher whose velocity points straight at x1 lands on x1 exactly in any number of
    steps from any state and time; one step is one Euler step over [t, 1]; each sample
    keeps its own t."""
    generator = torch.Generator().manual_seed(4)
    x, x1 = (torch.randn(3, 2, 2, 4, 4, generator=generator) for _ in range(2))
    t = torch.tensor([0.0, 0.3, 0.9])

    def straight(x_t, t_now):
        return (x1 - x_t) / (1 - t_now).view(-1, 1, 1, 1, 1)

    for steps in (1, 2, 5):
        torch.testing.assert_close(teacher_trajectory_target(straight, x, t, steps), x1)
    curved = lambda x_t, t_now: torch.sin(x_t) * (1 + t_now).view(-1, 1, 1, 1, 1)  # noqa: E731
    one_step = x + (1 - t).view(-1, 1, 1, 1, 1) * curved(x, t)
    torch.testing.assert_close(teacher_trajectory_target(curved, x, t, 1), one_step)
    two = teacher_trajectory_target(curved, x, t, 2)
    for b in range(3):  # a sample's result does not depend on its neighbours' times
        alone = teacher_trajectory_target(curved, x[b:b + 1], t[b:b + 1], 2)
        torch.testing.assert_close(two[b:b + 1], alone)


def test_backward_inputs_are_each_samples_own_euler_trajectory():
    times = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)

    def student(x, t):
        return -x + t.view(-1, 1)

    noise = torch.randn((3, 5), generator=torch.Generator().manual_seed(1))
    x = backward_inputs(student, noise, times, torch.tensor([0, 2, 1]))
    expected = noise.clone()
    for j in range(2):
        expected = expected + (times[j + 1] - times[j]).item() * (-expected + times[j].item())
        if j == 0:
            assert torch.equal(x[2], expected[2])
    assert torch.equal(x[0], noise[0]) and torch.allclose(x[1], expected[1])
    # a sample's input does not depend on its neighbours' steps, nor on extra forwards
    alone = backward_inputs(student, noise[2:], times, torch.tensor([1]))
    assert torch.equal(alone[0], x[2])
    assert torch.equal(backward_inputs(student, noise, times, torch.tensor([0, 2, 1]), 2), x)
    with pytest.raises(ValueError, match="cannot reach step 2"):
        backward_inputs(student, noise, times, torch.tensor([0, 2, 1]), 1)


# ------------------------------------------------------------------ the task


def task_and_model(overrides: list[str]):
    from trainer.init_from import initialise_from

    cfg = compose_train(DISTILL + overrides)
    task = DistillTask(cfg, single_process(CPU))
    model = task.build_model()
    initialise_from(cfg, model, None, is_main=False)
    return task, model


def test_student_inputs_come_from_its_own_trajectory_not_the_data(teacher_path):
    task, model = task_and_model([f"trainer.init_from={teacher_path}"])
    rows = slice(0, 4)
    step = next(s for s in range(1, 100)
                if {0, 2} <= set(task.student_steps(StepDraws(0, s), rows).tolist()))
    draws = StepDraws(0, step)
    drawn = task.student_steps(draws, rows)
    calls = []

    def spy(x, t, text):
        calls.append((x.detach().clone(), t.clone(), torch.is_grad_enabled()))
        return model(x, t, text)

    loss = task.distill_loss(spy, video_batch(0), draws, rows, forwards=2)
    graded = [call for call in calls if call[2]]
    assert len(graded) == 1 and len(calls) == 3  # two no-grad trajectory steps, one graded
    x, t, _ = graded[0]
    assert torch.equal(t, task.times[drawn].float())
    noise = draws.per_sample("noise", rows, lambda g: torch.randn((1, *x.shape[1:]),
                                                                  generator=g))
    own = backward_inputs(lambda x_t, s: model(x_t, s, CAPTIONS), noise, task.times, drawn)
    assert torch.equal(x, own)
    assert torch.equal(x[drawn == 0], noise[drawn == 0])  # step 0: pure noise
    # other videos of the same captions: the same loss (the data are never noised)
    assert torch.equal(task.distill_loss(model, video_batch(1), draws, rows, 2), loss)

    loss.backward()
    teacher = task.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_config_errors_name_the_key_and_the_fix(teacher_path):
    with pytest.raises(ConfigError, match="set task=distill"):
        DistillTask(compose_train([*DISTILL, "task=t2v"]), single_process(CPU))
    with pytest.raises(ConfigError, match="trainer.init_from, which is not set"):
        DistillTask(compose_train(DISTILL), single_process(CPU))
    with pytest.raises(ConfigError, match=r"recipe.times=\[0.0, 0.5, 1.0\] must hold"):
        compose_train([*DISTILL, "recipe.times=[0,0.5,1]"])
    with pytest.raises(ConfigError, match="must increase strictly"):
        compose_train([*DISTILL, "recipe.steps=2", "recipe.times=[0,0.7,0.5]"])
    with pytest.raises(ConfigError, match="recipe.caption_dropout=0.1"):
        compose_train([*DISTILL, "recipe.caption_dropout=0.1"])
    cfg = compose_train([*DISTILL, f"trainer.init_from={teacher_path}", "recipe.steps=2",
                         "recipe.times=[0,0.25,1]"])
    assert student_sampling(cfg, 2).tolist() == [0.0, 0.25, 1.0]
    with pytest.raises(ConfigError, match="distilled for 2 steps .* pass steps=2"):
        student_sampling(cfg, 50)
    assert student_sampling(compose_train(BASE), 50) is None


# ------------------------------------------------------------------ a mesh

STEPS = 2


def run_distill_steps(overrides: list[str]) -> dict:
    """The real train_step for STEPS steps: losses, first-step gradients, final weights."""
    from parallel.engine import NativeEngine
    from trainer.ema import EMA
    from trainer.init_from import initialise_from
    from trainer.optim import build_optimizer
    from trainer.train import start_parallel, train_step

    cfg = compose_train(DISTILL + overrides)
    ctx = start_parallel(cfg)
    task = DistillTask(cfg, ctx)
    model = task.build_model()
    initialise_from(cfg, model, None, ctx.is_main)
    engine = NativeEngine(model, lambda p: build_optimizer(p, cfg.recipe, 10, fused=True))
    ema = EMA(engine.ema_tensors(), 0.5)
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    losses, grads = [], {}
    for step in range(1, STEPS + 1):
        batch = video_batch(step)
        batch = {"video": batch["video"][rows], "caption": batch["caption"][rows]}
        losses.append(float(train_step(cfg, step, batch, engine, task, ema, ctx)["loss"]))
        if step == 1:
            grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads,
            "weights": {n: full(p) for n, p in model.named_parameters()}}


@pytest.mark.parametrize("target", [[], ["recipe.target=teacher_trajectory",
                                          "recipe.teacher_steps=2"]])
def test_distill_on_two_data_parallel_ranks_matches_one_process(teacher_path, target):
    """Each rank draws different student steps for its rows, yet both run the global
    batch's largest number of trajectory forwards: losses, gradients and weights equal,
    for either target."""
    overrides = [f"trainer.init_from={teacher_path}", *target]
    expected = run_distill_steps(overrides)
    for rank, result in enumerate(run_distributed(run_distill_steps, 2,
                                                  [*overrides, "parallel.dp_shard=2"])):
        for got, want in zip(result["losses"], expected["losses"], strict=True):
            assert abs(got - want) <= 1e-5 * abs(want), rank
        for kind in ("grads", "weights"):
            assert result[kind].keys() == expected[kind].keys()
            for name, value in expected[kind].items():
                assert relative_error(result[kind][name], value) <= 1e-5, (rank, kind, name)


# ------------------------------------------------------------------ the CLI

TINY_DISTILL = ["experiment=distill_tiny", "recipe.batch_size=4", "recipe.lr=1e-3",
                "trainer.ckpt_every=4", "trainer.val_every=8", "trainer.log_every=1",
                "trainer.sample_every=1000"]


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_then_the_export_samples_in_three_steps(tmp_path):
    from trainer.export import ExportConfig, export
    from trainer.sample import main as sample_main

    def cmd(run_dir):
        return train_cmd(run_dir, *TINY_DISTILL, f"trainer.init_from={teacher}",
                         "trainer.max_steps=12", *QUIET)

    teacher = init_file(tmp_path, [*TINY, "experiment=distill_tiny"])
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(cmd(reference))
    expected = train_losses(reference)
    assert sorted(expected) == list(range(1, 13))

    process = subprocess.Popen(cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(train_losses(killed), default=0) >= 5:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and 5 <= max(train_losses(killed)) < 12
    result = run(cmd(killed))
    assert "resumed from" in result.stdout
    assert train_losses(killed) == expected  # exact float equality, every step

    exported = export(ExportConfig(checkpoint=str(reference),
                                   output=str(tmp_path / "student.safetensors")))
    frames = {}
    for source in (reference, exported):
        out = tmp_path / f"samples_{source.name}"
        sample_main([f"checkpoint={source}", "prompt=a red square moving left", "steps=3",
                     f"output_dir={out}"])
        (path,) = out.glob("*.mp4")
        frames[source], _ = read_video(path)
    assert tuple(frames[reference].shape) == (4, 16, 16, 3)
    assert torch.equal(frames[reference], frames[exported])  # the file carries the times
    with pytest.raises(SystemExit, match="distilled for 3 steps .* pass steps=3"):
        sample_main([f"checkpoint={exported}", "prompt=a red square", "steps=50",
                     f"output_dir={tmp_path}"])
