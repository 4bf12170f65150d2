"""Chaos: a 4-process torchrun run SIGKILLed on one random rank at random points, restarted
with the same command each time until it finishes.

Kill points: mid-checkpoint (the moment the checkpoint's ``.tmp-step_…`` folder appears,
proven afterwards: the folder is still there and its step was never published), mid-step
(a random delay after a logged step) and during start-up (a random delay after the
workers spawn, landing in imports, set-up or the restore). After every kill torchrun must
exit (no rank hangs on the dead one), the newest intact checkpoint must be no older than
the newest one published before the kill (none lost, pruning never removes the last
intact one), no published checkpoint may fail verification unless it is an older one
whose pruning the kill interrupted, and the next launch resumes from exactly the newest
intact one. At the end the final checkpoint's tensors (model, EMA, optimizer) and trainer
state, and every logged record (train losses of replayed steps included), equal an
uninterrupted run's bit for bit.

``tests/test_chaos.py`` runs two kills (each relaunch costs a 4-process start-up, ~25 s of
CPU); the longer run is ``make chaos`` (``python -m tests.chaos --kills 10 [--seed N]
[--dir D]``), its kill points drawn from the seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from parallel.checkpoint import TENSORS_DIR, TRAINER_STATE_FILE, Checkpointer
from tests.conftest import ROOT
from tests.test_distributed_train import MESH, torchrun_cmd
from tests.test_preemption import children
from tests.test_train_e2e import QUIET

PROCESSES = 4
CKPT_EVERY = 2
KEEP_LAST = 2
POLL_S = 0.02  # a checkpoint of this run takes >= 0.1 s to save
LAUNCH_TIMEOUT_S = 600
HANG_LIMIT_S = 180  # torchrun still running this long after a rank died: hung
KILL_POINTS = ("checkpoint", "step", "start")


def overrides(steps: int) -> list[str]:
    # FSDP2 over 4 ranks: every tensor sharded, the cheapest 4-rank mesh on gloo; no loader
    # processes, so a kill leaves no orphans and start-up stays short
    return [*MESH, *QUIET, "parallel.dp_shard=4", "data.num_workers=0",
            f"trainer.max_steps={steps}", f"trainer.ckpt_every={CKPT_EVERY}",
            f"trainer.keep_last={KEEP_LAST}"]


def steps_for(kills: int) -> int:
    """Room for most kills to land before the end (each targets at most two checkpoints
    ahead of where its launch resumes; one with no room left is a start-up kill)."""
    return 2 * CKPT_EVERY * (kills + 2)


def launch(run_dir: Path, steps: int, name: str) -> subprocess.Popen:
    """The training command under torchrun; stdout/stderr go to ``<run_dir>.<name>.out/err``
    (files, not pipes: a full pipe would stall the workers while the test polls)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.{name}.out", "w") as out, open(f"{run_dir}.{name}.err", "w") as err:
        return subprocess.Popen(torchrun_cmd(PROCESSES, run_dir, *overrides(steps)),
                                cwd=ROOT, stdout=out, stderr=err, text=True)


def output(run_dir: Path, name: str) -> tuple[str, str]:
    return Path(f"{run_dir}.{name}.out").read_text(), Path(f"{run_dir}.{name}.err").read_text()


def step_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def newest_intact(run_dir: Path) -> int:
    """The step the trainer would resume from (0: none), after checking that every
    published checkpoint that fails verification is older than it: only an interrupted
    pruning may leave one, never a half-written save."""
    checkpointer = Checkpointer(run_dir / "checkpoints", KEEP_LAST)
    latest = checkpointer.latest()
    newest = 0 if latest is None else step_of(latest.name)
    for directory in checkpointer.step_dirs():
        problem = checkpointer.verify(directory)
        assert problem is None or step_of(directory.name) < newest, (
            f"published checkpoint {directory} is damaged and not older than the newest "
            f"intact one (step {newest}): {problem}")
    return newest


def records(run_dir: Path, offset: int = 0) -> list[dict]:
    """metrics.jsonl records written after byte ``offset`` (a line still being written is
    left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode().split("\n")[:-1]
    return [json.loads(line) for line in lines]


class ChaosRun:
    """One run directory killed and relaunched; ``published`` is the newest checkpoint step
    seen published (a ``step_`` folder appears only by the final rename)."""

    def __init__(self, run_dir: Path, steps: int, rng: random.Random, say: Callable):
        self.run_dir, self.steps, self.rng, self.say = run_dir, steps, rng, say
        self.published = 0
        self.launches = 0

    def watch(self, process: subprocess.Popen, until: Callable[[], bool]) -> bool:
        """Poll until ``until()`` holds (True) or the launch exits (False)."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        checkpoints = self.run_dir / "checkpoints"
        while process.poll() is None:
            if checkpoints.is_dir():
                steps = [step_of(p) for p in os.listdir(checkpoints) if p.startswith("step_")]
                self.published = max([self.published, *steps])
            if until():
                return True
            assert time.monotonic() < deadline, f"launch {self.launches} made no progress"
            time.sleep(POLL_S)
        return False

    def ranks(self, process: subprocess.Popen) -> dict[int, int]:
        """rank -> pid of torchrun's workers, once all of them run the trainer."""
        found: dict[int, int] = {}

        def all_started() -> bool:
            for pid in children(process.pid):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                found.update({int(item[5:]): pid for item in environ
                              if item.startswith(b"RANK=")})
            return len(found) == PROCESSES

        assert self.watch(process, all_started), f"torchrun exited with {process.returncode}"
        return found

    def wait_for_kill_point(self, point: str, process: subprocess.Popen, resumed: int,
                            offset: int) -> int | None:
        """Return at the kill point (for ``checkpoint``: the step being saved). Near the
        end a ``step`` kill becomes a ``checkpoint`` one and that a ``start`` one, so the
        kill always lands before the launch finishes."""
        checkpoints = self.run_dir / "checkpoints"
        if point == "step" and resumed + 2 * CKPT_EVERY < self.steps:
            target = resumed + self.rng.randint(1, 2 * CKPT_EVERY - 1)
            reached = self.watch(process, lambda: any(
                r["kind"] == "train" and r["step"] >= target
                for r in records(self.run_dir, offset)))
            assert reached, f"the launch ended before step {target}"
            time.sleep(self.rng.uniform(0.0, 0.5))
            return None
        # a stale .tmp- folder of an earlier kill is never the target: its name would be
        # seen before this launch's save removes and recreates it
        stale = {p.name for p in checkpoints.glob(".tmp-*")} if checkpoints.is_dir() else set()
        targets = [t for t in (resumed + CKPT_EVERY, resumed + 2 * CKPT_EVERY)
                   if t <= self.steps and f".tmp-step_{t:08d}" not in stale]
        if point == "start" or not targets:
            # anywhere in imports, set-up, the restore or the first steps
            time.sleep(self.rng.uniform(0.0, 10.0))
            return None
        target = self.rng.choice(targets)
        tmp = checkpoints / f".tmp-step_{target:08d}"
        assert self.watch(process, tmp.is_dir), f"the launch ended before saving step {target}"
        return target

    def relaunch(self, point: str | None) -> str:
        """One launch of the command, killed at ``point`` on a random rank (None: left to
        finish): "mid-checkpoint" (provably), "killed", or "finished" (it ended first)."""
        before = newest_intact(self.run_dir)
        self.published = max(self.published, before)
        metrics = self.run_dir / "metrics.jsonl"
        offset = metrics.stat().st_size if metrics.exists() else 0
        name = f"launch{self.launches}"
        self.launches += 1
        process = launch(self.run_dir, self.steps, name)
        rank = saving = killed_at = None
        try:
            if point is not None:
                pids = self.ranks(process)
                saving = self.wait_for_kill_point(point, process, before, offset)
                rank = self.rng.randrange(PROCESSES)
                with contextlib.suppress(ProcessLookupError):  # it finished: no kill
                    os.kill(pids[rank], signal.SIGKILL)
                    killed_at = time.monotonic()
            try:
                process.wait(timeout=HANG_LIMIT_S if killed_at else LAUNCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"torchrun still runs {HANG_LIMIT_S} s after rank {rank} "
                                     f"was killed: {output(self.run_dir, name)}") from None
        finally:
            process.kill()
            process.wait()
        stdout, stderr = output(self.run_dir, name)
        finished = process.returncode == 0
        # torchrun reports the killed rank's exit code -9 (SIGKILL)
        killed = killed_at is not None and re.search(r"exitcode\s*:\s*-9\b", stderr)
        assert finished != bool(killed), (
            process.returncode, stdout, stderr)
        # the surviving ranks end by themselves (trainer.train.exit_failed_rank), not by
        # torchrun's SIGKILL after its shutdown grace period
        assert "forcefully exiting" not in stderr, stderr
        check_resumed_from(stdout, before, required=finished)
        after = newest_intact(self.run_dir)
        assert after >= self.published, (
            f"checkpoint lost: step {self.published} was published before rank {rank} was "
            f"killed at {point}, the newest intact one after is step {after}")
        if finished:
            self.say(f"{name}: resumed at step {before}, finished")
            return "finished"
        checkpoints = self.run_dir / "checkpoints"
        mid_checkpoint = saving is not None and (
            (checkpoints / f".tmp-step_{saving:08d}").is_dir()
            and not (checkpoints / f"step_{saving:08d}").exists())
        self.say(f"{name}: resumed at step {before}, killed rank {rank} "
                 f"({f'saving step {saving}' if mid_checkpoint else point}); torchrun exited "
                 f"{time.monotonic() - killed_at:.1f} s later; newest intact: step {after}")
        return "mid-checkpoint" if mid_checkpoint else "killed"


def check_resumed_from(stdout: str, step: int, required: bool) -> None:
    """The launch resumed from the newest intact checkpoint (or started fresh without one)."""
    resumed = [line for line in stdout.splitlines() if line.startswith("resumed from ")]
    if step == 0 or not (resumed or required):
        assert not resumed, resumed
        return
    assert resumed and resumed[0].endswith(f"step_{step:08d} (step {step})"), (step, stdout)


def flat(value, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists/tuples as {path: leaf}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {prefix: value}
    return {k: v for key, item in items for k, v in flat(item, f"{prefix}{key}/").items()}


def checkpoint_state(directory: Path) -> dict[str, object]:
    """Every tensor (model, optimizer, EMA: the DCP shards gathered in one process) and
    every value of the trainer state, by path."""
    gathered = directory.parent.parent / f"{directory.name}.pt"
    dcp_to_torch_save(directory / TENSORS_DIR, gathered)
    tensors = torch.load(gathered, weights_only=False)
    gathered.unlink()
    return (flat(tensors, "tensors/")
            | flat(torch.load(directory / TRAINER_STATE_FILE, weights_only=False), "state/"))


def assert_bitwise_equal(got: Path, expected: Path) -> int:
    """The two checkpoints hold the same keys and bit-identical values; the tensor count."""
    ours, reference = checkpoint_state(got), checkpoint_state(expected)
    assert ours.keys() == reference.keys(), sorted(ours.keys() ^ reference.keys())
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key
        else:
            assert value == ours[key], (key, value, ours[key])
    tensors = sum(isinstance(v, torch.Tensor) for v in reference.values())
    assert any(k.startswith("tensors/model/") for k in reference), sorted(reference)[:5]
    assert any(k.startswith("tensors/optimizer/") for k in reference), sorted(reference)[:5]
    assert any(k.startswith("tensors/ema/") for k in reference), sorted(reference)[:5]
    return tensors


def chaos(root: Path, points: list[str], seed: int, steps: int | None = None,
          say: Callable = print) -> None:
    """One SIGKILL at each of ``points`` (``KILL_POINTS``; a mid-checkpoint kill that lost
    the race to the publish is tried again), ranks and delays drawn from ``seed``, against
    an uninterrupted run, which trains alongside; ``steps`` defaults to ``steps_for``."""
    assert "checkpoint" in points and set(points) <= set(KILL_POINTS), points
    kills = len(points)
    rng = random.Random(seed)
    steps = steps or steps_for(kills)
    reference_dir = root / "uninterrupted"
    reference = launch(reference_dir, steps, "launch0")
    run = ChaosRun(root / "chaos", steps, rng, say)
    try:
        outcomes: list[str] = []
        while len(outcomes) < kills or "mid-checkpoint" not in outcomes:
            assert len(outcomes) < kills + 3, f"no kill landed provably mid-checkpoint: {outcomes}"
            outcomes.append(run.relaunch(points[len(outcomes)] if len(outcomes) < kills
                                         else "checkpoint"))
            if outcomes[-1] == "finished":
                break
        assert "mid-checkpoint" in outcomes, outcomes
        if outcomes[-1] != "finished":
            run.relaunch(None)
        reference.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        reference.kill()
    assert reference.returncode == 0, output(reference_dir, "launch0")

    expected = {(r["kind"], r["step"]): r for r in records(reference_dir)}
    got = records(run.run_dir)
    assert {(r["kind"], r["step"]) for r in got} == expected.keys()
    assert sorted(s for kind, s in expected if kind == "train") == list(range(1, steps + 1))
    for record in got:  # replayed steps included: exact floats
        assert record == expected[record["kind"], record["step"]], record
    final = f"step_{steps:08d}"
    tensors = assert_bitwise_equal(run.run_dir / "checkpoints" / final,
                                   reference_dir / "checkpoints" / final)
    kept = sorted(os.listdir(run.run_dir / "checkpoints"))
    assert kept == sorted(os.listdir(reference_dir / "checkpoints")), kept
    say(f"{run.launches + 1} launches: every record and all {tensors} tensors of {final} "
        f"equal the uninterrupted run's; checkpoints kept: {kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the two runs go (default: a new temporary folder)")
    args = parser.parse_args()
    if args.kills < 1:
        parser.error(f"--kills={args.kills} must be >= 1")
    seed = random.randrange(2**32) if args.seed is None else args.seed
    draw = random.Random(f"points {seed}")
    points = ["checkpoint", *(draw.choice(KILL_POINTS) for _ in range(args.kills - 1))]
    root = args.dir or Path(tempfile.mkdtemp(prefix="chaos-"))
    print(f"chaos: kills at {points}, --seed {seed}, runs in {root}", flush=True)
    chaos(root, points, seed, say=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
