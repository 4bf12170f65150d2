"""Preemption through the real torchrun CLI: SIGUSR1 to every rank mid-run (as SLURM's
``--signal=USR1@<seconds>`` sends it) checkpoints the current step and exits with the
requeue code; the rerun of the same command resumes there and every loss equals an
uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from parallel.preemption import REQUEUE_EXIT_CODE
from tests.conftest import ROOT
from tests.test_distributed_train import MESH, torchrun_cmd
from tests.test_train_e2e import QUIET, run, train_losses

pytestmark = pytest.mark.slow

STEPS = 30
RUN = [*MESH, *QUIET, "parallel.dp_shard=2", f"trainer.max_steps={STEPS}"]


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command name in (…) may hold spaces: fields after its ")" are fixed
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
             if line.endswith("}") and '"kind": "train"' in line]
    return max(steps, default=0)


def test_sigusr1_checkpoints_exits_for_requeue_and_the_rerun_is_bitwise(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    run(torchrun_cmd(2, uninterrupted, *RUN), timeout=600)

    run_dir = tmp_path / "preempted"
    process = subprocess.Popen(torchrun_cmd(2, run_dir, *RUN), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while last_step(run_dir) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        workers = children(process.pid)
        assert len(workers) == 2, workers
        for pid in workers:  # SLURM signals every task, not the launcher
            os.kill(pid, signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    stopped = last_step(run_dir)
    assert 2 <= stopped < STEPS, (stopped, stdout, stderr)
    assert f"preempted: checkpointed step {stopped}; exiting with code 75" in stdout
    assert re.search(rf"exitcode\s*:\s*{REQUEUE_EXIT_CODE}", stderr), stderr
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()

    result = run(torchrun_cmd(2, run_dir, *RUN), timeout=600)
    assert f"(step {stopped})" in result.stdout
    assert train_losses(run_dir) == train_losses(uninterrupted)  # exact float equality
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
