"""One live launch per run directory: a second launch is refused naming the holder, and
the lock of a killed holder does not outlive it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.test_train_e2e import ROOT, train_cmd
from trainer.run_lock import RunDirInUse, RunDirLock

HOLD = ("import sys, time; from trainer.run_lock import RunDirLock; "
        "lock = RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_second_holder_is_refused_naming_the_first(holder, tmp_path):
    with pytest.raises(RunDirInUse, match=rf"in use by pid {holder.pid} on host .*run_name="):
        RunDirLock(tmp_path / "run").acquire()


def test_a_killed_holder_leaves_no_stale_lock(holder, tmp_path):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunDirLock(tmp_path / "run").acquire()
    lock.release()
    RunDirLock(tmp_path / "run").acquire().release()  # released means free again


def test_a_train_launch_on_a_held_run_dir_exits_before_writing(holder, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(train_cmd(run_dir, "trainer.max_steps=2",
                                      "trainer.wandb.mode=disabled"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"is in use by pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.jsonl").exists()


def _acquire_on_every_rank(run_dir: str) -> str:
    dist.init_process_group("gloo")
    try:
        RunDirLock(run_dir).acquire(is_main=dist.get_rank() == 0)
    except RunDirInUse as error:
        return str(error)
    return "acquired"


def test_every_rank_of_a_refused_launch_raises_together(holder, tmp_path):
    messages = run_distributed(_acquire_on_every_rank, 2, str(tmp_path / "run"), timeout=120)
    assert all(f"pid {holder.pid}" in message for message in messages), messages


def test_this_process_takes_over_its_own_unreleased_lock(tmp_path):
    first = RunDirLock(tmp_path / "run").acquire()  # e.g. a train() that raised
    RunDirLock(tmp_path / "run").acquire().release()
    first.release()
