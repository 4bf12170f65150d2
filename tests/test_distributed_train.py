"""The real torchrun CLI on a mesh: same losses as one process, and checkpoints that
reshard (save at tp2×cp2 on 4 ranks, resume at dp2 on 2 ranks and on 1 process)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_train_e2e import QUIET, TINY, run, train_cmd, train_losses

pytestmark = pytest.mark.slow

# 3 frames of 16 x 16: 3 x 4 x 4 = 48 tokens per sample
MESH = ["model=dit_tiny", "data.frames=3", "trainer.ckpt_every=3", "trainer.val_every=100"]


def torchrun_cmd(processes: int, run_dir, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "trainer.train",
            f"hydra.run.dir={run_dir}", *TINY, *overrides]


def assert_losses_close(got: dict, expected: dict, steps) -> None:
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got,
                                                                                expected)


def test_torchrun_mesh_trains_like_one_process_and_resumes_at_other_meshes(tmp_path):
    single = tmp_path / "single"
    run(train_cmd(single, *MESH, *QUIET, "trainer.max_steps=6"))
    expected = train_losses(single)

    mesh = tmp_path / "tp2_cp2"
    run(torchrun_cmd(4, mesh, *MESH, *QUIET, "trainer.max_steps=3", "parallel.tp=2",
                     "parallel.cp=2", "parallel.cp_mode=ring"), timeout=600)
    assert_losses_close(train_losses(mesh), expected, range(1, 4))

    # the tp2×cp2 checkpoint of step 3 continues on 2 data-parallel ranks ...
    dp2 = tmp_path / "dp2"
    shutil.copytree(mesh, dp2)
    result = run(torchrun_cmd(2, dp2, *MESH, *QUIET, "trainer.max_steps=6",
                              "parallel.dp_shard=2"), timeout=600)
    assert "resumed from" in result.stdout
    assert_losses_close(train_losses(dp2), expected, range(4, 7))

    # ... and in one process
    one = tmp_path / "one"
    shutil.copytree(mesh, one)
    run(train_cmd(one, *MESH, *QUIET, "trainer.max_steps=6"))
    assert_losses_close(train_losses(one), expected, range(4, 7))


def test_mesh_that_does_not_match_the_process_count_fails_at_start(tmp_path):
    result = subprocess.run(
        train_cmd(tmp_path / "bad", *QUIET, "parallel.tp=2", "parallel.cp=2"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("config error: world size 1 is not divisible by parallel.dp_replicate=1 × "
            "parallel.cp=2 × parallel.tp=2 = 4") in result.stderr


def test_fsdp_resume_at_the_same_mesh_is_bitwise_and_exports(tmp_path):
    """A 2-rank FSDP2 run resumed at its own mesh repeats the uninterrupted losses exactly,
    and exports one safetensors file equal to loading it in one process."""
    from safetensors.torch import load_file

    from trainer.trained import load_run

    fsdp = [*MESH, *QUIET, "parallel.dp_shard=2"]
    uninterrupted = tmp_path / "uninterrupted"
    run(torchrun_cmd(2, uninterrupted, *fsdp, "trainer.max_steps=5"), timeout=600)
    run_dir = tmp_path / "fsdp"
    run(torchrun_cmd(2, run_dir, *fsdp, "trainer.max_steps=3"), timeout=600)
    run(torchrun_cmd(2, run_dir, *fsdp, "trainer.max_steps=5"), timeout=600)
    assert train_losses(run_dir) == train_losses(uninterrupted)  # exact float equality
    output = tmp_path / "weights.safetensors"
    result = run([sys.executable, "-m", "trainer.export", f"checkpoint={run_dir}",
                  f"output={output}", "ema=false"])
    assert f"wrote {output}" in result.stdout
    exported = load_file(output)
    trained = load_run(run_dir, torch.device("cpu"), ema=False).model.state_dict()
    assert exported.keys() == trained.keys() and len(exported) > 20
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name
    assert not torch.equal(exported["dit.final.proj.weight"],
                           torch.zeros_like(exported["dit.final.proj.weight"]))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process_and_resumes(tmp_path, stage):
    from safetensors.torch import load_file

    single = tmp_path / "single"
    run(train_cmd(single, *MESH, *QUIET, "trainer.max_steps=5"))
    expected = train_losses(single)
    zero = tmp_path / f"zero{stage}"
    common = [*MESH, *QUIET, "parallel=deepspeed", f"parallel.zero_stage={stage}"]
    run(torchrun_cmd(2, zero, *common, "trainer.max_steps=3"), timeout=600)
    assert (zero / "checkpoints" / "step_00000003" / "deepspeed").is_dir()
    result = run(torchrun_cmd(2, zero, *common, "trainer.max_steps=5"), timeout=600)
    assert "resumed from" in result.stdout
    assert_losses_close(train_losses(zero), expected, range(1, 6))
    # the DeepSpeed checkpoint exports (and samples) in one process like a native one
    for ema in (True, False):
        exported = {}
        for name, run_dir in (("single", single), ("zero", zero)):
            exported[name] = tmp_path / f"{name}_{ema}.safetensors"
            run([sys.executable, "-m", "trainer.export", f"checkpoint={run_dir}",
                 f"output={exported[name]}", f"ema={str(ema).lower()}"])
        ours, reference = (load_file(exported[n]) for n in ("zero", "single"))
        assert ours.keys() == reference.keys()
        for name, value in reference.items():
            error = ((ours[name] - value).norm() / value.norm().clamp_min(1e-12)).item()
            assert error <= 1e-5, (ema, name, error)


def replica_keys(overrides):
    from tests.conftest import compose_train
    from trainer.data import build_datasets, build_train_batches
    from trainer.train import start_parallel

    cfg = compose_train(["experiment=t2v_tiny", "recipe.batch_size=4", "data.num_samples=64",
                         *overrides])
    ctx = start_parallel(cfg)
    batches = iter(build_train_batches(cfg, build_datasets(cfg.data)[0], ctx))
    return ctx.dp_rank, [key for _ in range(3) for key in next(batches)["key"]]


@pytest.mark.parametrize("mesh", [["parallel.dp_shard=2", "parallel.cp=2"],
                                  ["parallel.dp_replicate=2", "parallel.tp=2"]])
def test_ranks_of_a_replica_see_the_same_samples_replicas_differ(mesh):
    results = run_distributed(replica_keys, 4, mesh)
    by_replica: dict[int, list] = {}
    for dp_rank, keys in results:
        assert by_replica.setdefault(dp_rank, keys) == keys  # cp/tp peers: identical
    assert sorted(by_replica) == [0, 1]
    assert not set(by_replica[0]) & set(by_replica[1])
    assert len(set(by_replica[0] + by_replica[1])) == 12  # 3 global batches of 4
