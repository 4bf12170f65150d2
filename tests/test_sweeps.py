"""Sweeps through hydra-submitit-launcher: a real local sweep of two tiny runs, and the
SLURM job script the slurm_h100 cluster config submits, run with stand-ins for srun and
scontrol: it exports the rendezvous and requeues only a job that checkpointed for
preemption (exit 75)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from parallel.mesh import read_launch_env
from tests.conftest import ROOT, python_cmd
from tests.test_train_e2e import QUIET, TINY, run


@pytest.mark.slow
def test_local_sweep_trains_each_point_in_its_own_submitit_job(tmp_path):
    sweep = tmp_path / "sweep"
    run(python_cmd("trainer.train", "--multirun", "cluster=local", f"hydra.sweep.dir={sweep}",
                   *TINY, *QUIET, "trainer.max_steps=3", "trainer.log_every=1",
                   "recipe.lr=1e-3,5e-4"))
    lrs = {}
    for job, lr in (("0", 1e-3), ("1", 5e-4)):
        run_dir = sweep / job
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").recipe.lr == lr
        assert (run_dir / "checkpoints" / "step_00000003").is_dir()
        records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        lrs[job] = [r["lr"] for r in records if r["kind"] == "train"]
        assert len(lrs[job]) == 3
    # the same warmup schedule, scaled by each job's own recipe.lr
    assert lrs["1"] == pytest.approx([lr / 2 for lr in lrs["0"]])
    # each point ran as its own submitit job, which pickled its result on success
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


def test_submitit_local_with_several_tasks_is_refused():
    with pytest.raises(ValueError, match="tasks_per_node=2 under submitit_local"):
        read_launch_env({"SUBMITIT_LOCAL_NTASKS": "2"})
    assert read_launch_env({"SUBMITIT_LOCAL_NTASKS": "1"}).world_size == 1


def stand_in(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def slurm_sweep(tmp_path, monkeypatch):
    """The job script and pickled jobs the SLURM launcher submits for a two-point sweep
    with cluster=slurm_h100 (sbatch replaced by a copy of its script; no cluster)."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from trainer.config import register_configs
    from trainer.run_config import CONF_DIR

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir / "sbatch",
             f'cp "$1" {tmp_path}/job.sbatch\necho "Submitted batch job 4242"\n')
    # srun: note the environment every task gets, then run the task's command
    stand_in(bin_dir / "srun", f'echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT '
             f'OMP_NUM_THREADS=$OMP_NUM_THREADS SLURM_KILL_BAD_EXIT=$SLURM_KILL_BAD_EXIT" '
             f'>> {tmp_path}/calls\n'
             'while [ "${1#--}" != "$1" ]; do\n'
             '  if [ "$1" = --unbuffered ]; then shift; else shift 2; fi\ndone\nexec "$@"\n')
    stand_in(bin_dir / "scontrol", f'echo "scontrol $*" >> {tmp_path}/calls\n'
             'if [ "$1" = show ]; then printf "gpu3\\ngpu4\\n"; fi\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=["cluster=slurm_h100",
                                          f"hydra.sweep.dir={tmp_path}/sweep"],
                      return_hydra_config=True)
    assert cfg.trainer.device == "cuda"
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    # submitted, not waited for: there is no cluster to finish the jobs
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda job: [None])
    launcher.launch([["recipe.lr=1e-3"], ["recipe.lr=5e-4"]], initial_job_idx=0)
    return tmp_path


def test_slurm_sweep_job_asks_for_the_gpus_and_usr1_before_the_limit(slurm_sweep):
    script = (slurm_sweep / "job.sbatch").read_text()
    directives = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert directives >= {"#SBATCH --array=0-1%2", "#SBATCH --partition=h100",
                          "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8",
                          "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=12",
                          "#SBATCH --time=2880", "#SBATCH --requeue",
                          "#SBATCH --signal=USR1@120"}
    # USR1 only: submitit's own USR2 would requeue from rank 0 mid-step, uncheckpointed
    assert [line for line in directives if "--signal" in line] == ["#SBATCH --signal=USR1@120"]


@pytest.mark.parametrize("job_exit,script_exit,requeued", [(75, 0, True), (1, 1, False)])
def test_slurm_sweep_job_requeues_only_a_preempted_job(slurm_sweep, job_exit, script_exit,
                                                       requeued):
    """The submitted script runs the submitit task of array element 1, replaced by one
    that exits like the trainer does (75: checkpointed for preemption; 1: an error
    such as a config error)."""
    from submitit.core.utils import DelayedSubmission

    pickled = slurm_sweep / "sweep" / ".submitit" / "4242_1" / "4242_1_submitted.pkl"
    assert pickled.is_file()
    DelayedSubmission(sys.exit, job_exit).dump(pickled)
    env = {**os.environ, "SLURM_JOB_ID": "4244", "SLURM_ARRAY_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NODELIST": "gpu[3-4]", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    result = subprocess.run(["bash", str(slurm_sweep / "job.sbatch")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == script_exit, result.stdout + result.stderr
    calls = (slurm_sweep / "calls").read_text()
    assert (f"MASTER_ADDR=gpu3 MASTER_PORT={20000 + 4244 % 20000} OMP_NUM_THREADS=8 "
            "SLURM_KILL_BAD_EXIT=1") in calls
    assert ("scontrol requeue 4244" in calls) == requeued
    # no result pickle: the waiting --multirun sees a requeued job, not a finished one
    assert not list(pickled.parent.glob("*_result.pkl"))
