"""Bad configs fail at start, through the real CLI, with the key and value named."""

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT, compose_train, python_cmd
from trainer.build import build_autoencoder
from trainer.config import ConfigError
from trainer.start_checks import check_latent_fits


def run_train(tmp_path, *overrides):
    return subprocess.run(python_cmd("trainer.train", f"hydra.run.dir={tmp_path}/run",
                                     *overrides),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def error_line(result, needle):
    lines = [line for line in result.stderr.splitlines() if needle in line]
    assert result.returncode != 0 and lines, result.stderr
    return lines[0]


def test_wrong_key_is_named(tmp_path):
    result = run_train(tmp_path, "model.depthh=2")
    assert "model.depthh" in error_line(result, "model.depthh")


def test_wrong_type_is_named(tmp_path):
    result = run_train(tmp_path, "model.depth=deep")
    line = error_line(result, "model.depth")
    assert "deep" in line


def test_wrong_enum_value_is_named(tmp_path):
    result = run_train(tmp_path, "trainer.precision=fp8")
    assert "trainer.precision" in error_line(result, "trainer.precision")


def test_inconsistent_pair_names_both_values(tmp_path):
    result = run_train(tmp_path, "model.width=100", "model.heads=3")
    line = error_line(result, "config error")
    assert "model.width=100" in line and "model.heads=3" in line


def test_cfg_job_prints_the_resolved_config(tmp_path):
    result = run_train(tmp_path, "model.depth=3", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "depth: 3" in result.stdout and "run_name: t2v_tiny" in result.stdout


def test_cross_group_checks_name_both_sides():
    cfg = compose_train(["model.in_channels=16"])
    with pytest.raises(ConfigError, match="model.in_channels=16 .* 12 latent channels"):
        check_latent_fits(cfg, build_autoencoder(cfg, "cpu"))
    cfg = compose_train(["data.height=34"])
    with pytest.raises(ConfigError, match="model.patch_h=2 does not divide the latent h-size 17"):
        check_latent_fits(cfg, build_autoencoder(cfg, "cpu"))
    cfg = compose_train(["data.width=31"])
    with pytest.raises(ConfigError, match="data frames/height/width=8/32/31"):
        check_latent_fits(cfg, build_autoencoder(cfg, "cpu"))
    cfg = compose_train(["model.patch_t=1", "model.max_patches_t=4"])
    with pytest.raises(ConfigError, match="exceeds model.max_patches_t=4"):
        check_latent_fits(cfg, build_autoencoder(cfg, "cpu"))


def test_value_range_checks():
    with pytest.raises(ConfigError, match="recipe.caption_dropout=1.5"):
        compose_train(["recipe.caption_dropout=1.5"])
    with pytest.raises(ConfigError, match="trainer.max_steps=0"):
        compose_train(["trainer.max_steps=0"])


@pytest.mark.parametrize("model", ["dit_tiny", "dit_1b", "dit_5b", "dit_30b"])
def test_every_model_option_composes(model):
    assert compose_train([f"model={model}"]).model.depth > 0


def test_model_size_reports_30b_on_meta_and_writes_nothing(tmp_path):
    result = subprocess.run(python_cmd("trainer.model_size", "model=dit_30b"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "29,260,492,800 parameters (29.26B" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_parallel_misconfigurations_name_the_numbers():
    from trainer.start_checks import check_parallel_fits

    def fits(overrides, world):
        return check_parallel_fits(compose_train(["experiment=t2v_tiny", *overrides]), world)

    assert fits(["parallel.tp=2", "parallel.cp=2"], 8).shape == (1, 2, 2, 2)
    with pytest.raises(ConfigError, match=r"world size 4 != parallel.dp_replicate=1 × "
                                          r"parallel.dp_shard=2 × parallel.cp=1 × "
                                          r"parallel.tp=1 = 2"):
        fits(["parallel.dp_shard=2"], 4)
    with pytest.raises(ConfigError, match="model.heads=6 is not divisible by parallel.tp=4"):
        fits(["model.width=96", "model.heads=6", "parallel.tp=4"], 4)
    with pytest.raises(ConfigError, match=r"cp_mode=ulysses needs model.heads=4 divisible by "
                                          r"parallel.tp × parallel.cp = 2 × 4"):
        fits(["parallel.tp=2", "parallel.cp=4", "parallel.cp_mode=ulysses"], 8)
    assert fits(["parallel.tp=2", "parallel.cp=4", "parallel.cp_mode=ring"], 8).cp == 4
    with pytest.raises(ConfigError, match=r"recipe.batch_size=8 \(the global batch\) is not "
                                          r"divisible by the 3 data-parallel replicas"):
        fits(["parallel.dp_shard=3"], 3)


@pytest.mark.parametrize("overrides, message", [
    (["parallel=deepspeed", "parallel.tp=2"],
     "parallel.engine=deepspeed supports data parallelism only, but parallel.tp=2"),
    (["parallel=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage=4 must be 1, 2 or 3"),
    (["parallel=deepspeed", "parallel.offload_params=true"],
     "parallel.offload_params=true needs parallel.zero_stage=3"),
])
def test_deepspeed_misconfigurations(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_train(["experiment=t2v_tiny", *overrides])


def test_launch_env_from_torchrun_slurm_or_nothing():
    from parallel.mesh import read_launch_env

    assert read_launch_env({}).launcher == "none"
    torchrun = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank) == (3, 4, 1)
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert read_launch_env(slurm).rank == 9 and read_launch_env(slurm).launcher == "slurm"
    with pytest.raises(ValueError, match="SLURM job without MASTER_ADDR"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_movie_gen_preset_fits_the_30b_on_64_gpus():
    from trainer.start_checks import check_parallel_fits

    cfg = compose_train(["experiment=t2v_tiny", "model=dit_30b", "parallel=movie_gen",
                         "recipe.batch_size=64"])
    assert check_parallel_fits(cfg, 64).shape == (1, 8, 2, 4)
