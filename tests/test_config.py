"""Bad configs fail at start, through the real CLI, with the key and value named."""

import os
import subprocess

import pytest

from tests.conftest import ROOT, compose_train, python_cmd
from trainer.build import build_autoencoder
from trainer.config import ConfigError, check_latent_fits


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
    with pytest.raises(ConfigError, match="data.frames/height/width=8/32/31"):
        check_latent_fits(cfg, build_autoencoder(cfg, "cpu"))
    cfg = compose_train(["model.max_patches_t=4"])
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
