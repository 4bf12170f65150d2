"""A training step that never waits for the device.

The loop reads the step values (loss, grad norm, lr, skip counts) to the host only every
``trainer.log_every`` steps and at validation, sample, checkpoint and last steps, with
the preemption vote in the same read; a non-finite step is skipped on the device (fused
AdamW's ``found_inf``, a zero EMA weight) and counted when read; the gradient norm over
every mesh dim is one collective, without DTensor's sequential-reduction warning.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from parallel.engine import NativeEngine, local_tensor
from tests.conftest import ROOT, compose_train
from tests.distributed import run_distributed
from trainer.step_log import NonFiniteGuard, StepLog

TINY = ["model.depth=1", "model.width=32", "model.heads=2", "model.ffn_dim=64",
        "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
        "text.encoders.byte.ffn_dim=64", "model=dit_tiny", "data.frames=2",
        "data.height=8", "data.width=8",
        "data.num_samples=64", "data.val_samples=0", "data.judge_prompts=0",
        "recipe.batch_size=2", "trainer.max_steps=9", "trainer.log_every=4",
        "trainer.ckpt_every=100", "trainer.val_every=100", "trainer.sample_every=100",
        "trainer.sample_prompts=[]", "trainer.wandb.mode=disabled", "trainer.progress=false"]
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# Reads of values the host needs each step, not of the step's results: the sampler's
# index order (a CPU tensor), and the dropout mask of raw captions, which are host
# strings (drawn on the training device: on a GPU still one small sync per step with
# raw captions; cached text encodings are masked on the device).
HOST_SIDE = {("data/loader.py", "_batch_indices"), ("trainer/objective.py", "drop_captions")}


def reading_site() -> tuple[str, str]:
    """The innermost frame of the project's own code (not the tests) asking for a read."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(str(ROOT)) and "/.venv/" not in path and "/tests/" not in path:
            return os.path.relpath(path, ROOT), frame.f_code.co_name
        frame = frame.f_back
    return "", ""


def train_counting_reads(run_dir, monkeypatch, on_step=lambda step: None):
    """Run ``trainer.train.train`` on TINY; whether it was preempted, and each host read
    from the first step on as (step, (file, function)) -> count."""
    import trainer.train as loop

    reads: Counter = Counter()
    current = {"step": None}
    real_step = loop.train_step

    def step(cfg, number, *args):
        current["step"] = number
        on_step(number)
        return real_step(cfg, number, *args)

    def counting(read):
        def counted(tensor, *args, **kwargs):
            if current["step"] is not None:
                reads[current["step"], reading_site()] += 1
            return read(tensor, *args, **kwargs)
        return counted

    monkeypatch.setattr(loop, "train_step", step)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    preempted = loop.train(compose_train(TINY), run_dir, {})
    return preempted, reads


def step_reads(reads: Counter) -> list[tuple[int, tuple[str, str]]]:
    return sorted((step, site) for (step, site), count in reads.items()
                  for _ in range(count) if site not in HOST_SIDE)


def train_records(run_dir) -> list[dict]:
    return [record for line in open(run_dir / "metrics.jsonl")
            if (record := json.loads(line))["kind"] == "train"]


def test_steps_read_the_host_only_every_log_every_steps(tmp_path, monkeypatch):
    preempted, reads = train_counting_reads(tmp_path, monkeypatch)
    assert not preempted
    # the first step, every 4th, the last: one transfer each, the preemption vote in it
    read = ("trainer/step_log.py", "read")
    assert step_reads(reads) == [(1, read), (4, read), (8, read), (9, read)]
    records = train_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 10))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert {r["skipped_steps"] for r in records} == {0}


def test_a_signal_stops_the_run_at_the_next_read(tmp_path, monkeypatch):
    def signal_at_step_two(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    preempted, reads = train_counting_reads(tmp_path, monkeypatch, signal_at_step_two)
    assert preempted
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert [step for step, _ in step_reads(reads)] == [1, 4]


def snapshot(engine, ema) -> list[torch.Tensor]:
    """Every weight, AdamW state tensor (moments, step count) and EMA tensor, copied."""
    state = [value for param in engine.params
             for value in engine.optimizer.state[param].values()]
    return [t.detach().clone() for t in (*engine.params, *state, *ema.shadow.values())]


def test_a_nonfinite_step_changes_nothing_and_the_read_counts_it():
    from trainer.ema import EMA
    from trainer.t2v_task import TextToVideoTask
    from trainer.train import build_engine, start_parallel, train_step

    cfg = compose_train(TINY)
    ctx = start_parallel(cfg)
    task = TextToVideoTask(cfg, ctx)
    engine = build_engine(cfg, task.build_model(), ctx)  # the trainer's: fused AdamW
    ema, log = EMA(engine.ema_tensors(), 0.5), StepLog(NonFiniteGuard(3))
    video = torch.rand(2, 3, 2, 8, 8) * 2 - 1
    batch = {"video": video, "caption": ["a red square", "a blue circle"]}
    log.add(1, train_step(cfg, 1, batch, engine, task, ema, ctx))
    before = snapshot(engine, ema)
    log.add(2, train_step(cfg, 2, {**batch, "video": video * math.nan}, engine, task, ema,
                          ctx))
    infinite = engine.params[0].register_hook(lambda grad: grad * math.inf)
    log.add(3, train_step(cfg, 3, batch, engine, task, ema, ctx))  # finite loss
    infinite.remove()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(engine, ema), before, strict=True))
    log.add(4, train_step(cfg, 4, batch, engine, task, ema, ctx))
    assert not torch.equal(engine.params[0], before[0])
    assert {s["step"].item() for s in engine.optimizer.state.values()} == {2.0}

    records = []
    assert log.read(lambda step, record: records.append(record)) == []
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2]
    assert math.isnan(records[1]["loss"]) and math.isnan(records[1]["grad_norm"])
    assert math.isfinite(records[2]["loss"]) and not math.isfinite(records[2]["grad_norm"])
    assert log.guard.in_row == 0


def test_the_read_stops_the_run_at_the_step_that_reached_the_limit():
    log = StepLog(NonFiniteGuard(limit=2))
    for step, loss in enumerate([1.0, math.nan, 2.0, math.nan, math.inf], start=1):
        log.add(step, {"loss": torch.tensor(loss), "grad_norm": torch.tensor(0.5), "lr": 0.1})
    written = []
    with pytest.raises(FloatingPointError, match="step 5: .* 2 steps in a row .*"
                                                 "trainer.max_nonfinite_steps=2"):
        log.read(lambda step, record: written.append((step, record["lr"])))
    assert written == [(1, 0.1), (2, 0.1), (3, 0.1), (4, 0.1)]
    assert log.read(lambda step, record: None, torch.tensor(1.0), torch.tensor(0.0)) == [1, 0]


def test_a_non_fused_checkpoint_keeps_the_engine_fused():
    """A checkpoint's param groups replace the optimizer's, its fused switch included."""
    model = torch.nn.Linear(3, 2)
    plain = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    plain.step()
    engine = NativeEngine(model, lambda params: (torch.optim.AdamW(params, fused=True), None))
    engine.optimizer.load_state_dict(plain.state_dict())
    assert engine.optimizer.param_groups[0]["fused"]
    weights = [p.detach().clone() for p in engine.params]
    engine.clip_and_step(math.inf, lambda norm: torch.tensor(False))  # refused on device
    assert all(torch.equal(p, w) for p, w in zip(engine.params, weights, strict=True))
    engine.clip_and_step(math.inf, lambda norm: torch.isfinite(norm))
    assert not torch.equal(engine.params[0], weights[0])
    assert {s["step"].item() for s in engine.optimizer.state.values()} == {2.0}


@contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """This process's stderr (file descriptor 2: Python's loggers and C++ alike) into
    ``path`` inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as file:
        os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def norm_and_skip(overrides: list[str]) -> dict:
    """One train step of the mesh-equivalence model, then a non-finite one: the first
    step's loss and grad norm, whether the second left this rank's shards, AdamW state
    and EMA as they were, and what this rank wrote to stderr."""
    from tests.test_parallel_equivalence import BASE, CAPTIONS
    from trainer.ema import EMA
    from trainer.t2v_task import TextToVideoTask
    from trainer.train import build_engine, start_parallel, train_step

    cfg = compose_train(BASE + overrides)
    ctx = start_parallel(cfg)
    task = TextToVideoTask(cfg, ctx)
    engine = build_engine(cfg, task.build_model(), ctx)
    ema = EMA(engine.ema_tensors(), 0.5)
    shape = (cfg.recipe.batch_size, 3, cfg.data.frames, cfg.data.height, cfg.data.width)
    video = torch.rand(shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
    local = cfg.recipe.batch_size // ctx.dp_size
    rows = slice(ctx.dp_rank * local, (ctx.dp_rank + 1) * local)
    batch = {"video": video[rows], "caption": CAPTIONS[rows]}
    with tempfile.TemporaryDirectory() as directory:
        logged = Path(directory) / "stderr.txt"
        with stderr_into(logged):
            first = train_step(cfg, 1, batch, engine, task, ema, ctx)
            before = [local_tensor(t).clone() for t in snapshot(engine, ema)]
            train_step(cfg, 2, {**batch, "video": batch["video"] * math.nan}, engine, task,
                       ema, ctx)
        after = [local_tensor(t) for t in snapshot(engine, ema)]
        return {"loss": first["loss"].item(), "grad_norm": first["grad_norm"].item(),
                "unchanged": all(torch.equal(a, b) for a, b in zip(after, before,
                                                                    strict=True)),
                "logged": logged.read_text()}


def test_the_grad_norm_over_fsdp_and_tp_is_one_quiet_collective():
    reference = norm_and_skip([])
    results = run_distributed(norm_and_skip, 4, ["parallel.dp_shard=2", "parallel.tp=2"])
    assert reference["unchanged"]
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), rank
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), rank
        assert result["unchanged"], rank
        assert "sequential" not in result["logged"], (rank, result["logged"])


def fresh_optimizer_state(overrides: list[str]) -> tuple[int, int]:
    """The parameters DCP finds optimizer state for in a fresh engine (it creates that
    state with one step, as a resume does first), and the trainable parameters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from tests.test_parallel_equivalence import BASE
    from trainer.t2v_task import TextToVideoTask
    from trainer.train import build_engine, start_parallel

    cfg = compose_train(BASE + overrides)
    ctx = start_parallel(cfg)
    engine = build_engine(cfg, TextToVideoTask(cfg, ctx).build_model(), ctx)
    state = get_optimizer_state_dict(engine.module, engine.optimizer)["state"]
    return len(state), len(engine.params)


def test_tensor_parallel_plain_and_dtensor_params_step_in_one_fused_call():
    """Under tp without FSDP the text conditioner's plain parameters share AdamW's fused
    kernel with the DiT's DTensors, also in the step DCP takes to create the state."""
    for with_state, trainable in run_distributed(fresh_optimizer_state, 2, ["parallel.tp=2"]):
        assert with_state == trainable > 0
