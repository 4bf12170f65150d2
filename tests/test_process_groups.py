"""Process groups and preemption: ``parallel.timeout_minutes`` reaches the world group and
every mesh group, ranks bind to ``local_rank % device_count``, the config checks name
their key, and a preemption signal on any rank is agreed by all."""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import timedelta

import pytest
import torch

from tests.conftest import compose_train
from tests.distributed import run_distributed
from trainer.config import ConfigError


def group_timeouts(overrides):
    import torch.distributed as dist

    from trainer.train import start_parallel

    ctx = start_parallel(compose_train(overrides))
    cpu = torch.device("cpu")
    timeouts = {name: mesh.get_group()._get_backend(cpu).options._timeout
                for name, mesh in ctx.named.items() if name != "hsdp"}
    timeouts["world"] = dist.group.WORLD._get_backend(cpu).options._timeout
    return timeouts


def test_timeout_reaches_the_world_and_every_mesh_group():
    for timeouts in run_distributed(group_timeouts, 2, ["parallel.dp_shard=2",
                                                        "parallel.timeout_minutes=7"]):
        assert set(timeouts) >= {"world", "dp_replicate", "dp_shard", "cp", "tp", "dp",
                                 "dp_shard_cp", "dp_cp"}
        assert all(t == timedelta(minutes=7) for t in timeouts.values()), timeouts


def test_cuda_ranks_bind_to_local_rank_modulo_the_visible_gpus(monkeypatch):
    from parallel import mesh

    bound = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    assert mesh.bind_device("cuda", 5) == torch.device("cuda", 1)
    assert mesh.bind_device("cuda", 0) == torch.device("cuda", 0)
    assert bound == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert mesh.bind_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="trainer.device=cuda but no CUDA device"):
        mesh.bind_device("cuda", 0)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.timeout_minutes=0"], "parallel.timeout_minutes=0.0 must be > 0"),
    (["parallel=deepspeed", "trainer.async_checkpoint=true"],
     "trainer.async_checkpoint=true writes DCP checkpoints, which parallel.engine=deepspeed"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_train(overrides)


def signal_on_rank_one(sig):
    import torch.distributed as dist

    from parallel.preemption import PreemptionFlag

    dist.init_process_group("gloo")
    flag = PreemptionFlag(torch.device("cpu"))
    before = flag.agreed()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), sig)
    after = flag.agreed()
    flag.close()
    return before, after, flag.signal


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_on_one_rank_is_agreed_by_every_rank(sig):
    results = run_distributed(signal_on_rank_one, 2, sig)
    assert [(before, after) for before, after, _ in results] == [(False, True)] * 2
    assert [received for _, _, received in results] == [None, sig]


@pytest.mark.parametrize("task_exit,requeued", [(75, True), (1, False), (0, False)])
def test_sbatch_requeues_only_on_the_preemption_exit_code(tmp_path, task_exit, requeued):
    """launch/slurm.sbatch with stand-ins for srun and scontrol: the tasks' exit code 75
    becomes `scontrol requeue <job>` (and success); any other code is passed through."""
    from parallel.preemption import REQUEUE_EXIT_CODE
    from tests.conftest import ROOT

    assert REQUEUE_EXIT_CODE == 75
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f'#!/bin/sh\necho "srun MASTER_PORT=$MASTER_PORT $*" >> {calls}\nexit {task_exit}\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "scontrol $*" >> {calls}\necho node0\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "123457",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "run_name=x"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == (0 if requeued else task_exit), result.stderr
    log = calls.read_text()
    assert f"MASTER_PORT={20000 + 123457 % 20000} " in log
    assert "-m trainer.train trainer.device=cuda run_name=x" in log
    assert ("scontrol requeue 123457" in log) == requeued
    script = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@" in script
