"""A config read back from a run directory, checkpoint or weights file may only build
classes of this project: a crafted ``_target_`` naming anything else (``os.system``) is
refused with a message, and never imported or called."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from omegaconf import OmegaConf

from parallel.manifest import write_manifest
from tests.conftest import ROOT, compose_train, python_cmd
from trainer.config import ConfigError
from trainer.resume_settings import launch_metadata, plain_config
from trainer.run_config import CONFIG_KEY, OVERRIDES_KEY, config_from_metadata


def crafted(set_key, value):
    """A saved config as ``trainer.export`` or a checkpoint stores it, with one node's
    value replaced."""
    config = plain_config(compose_train([]))
    node = config
    *path, last = set_key.split(".")
    for name in path:
        node = node[name]
    node[last] = value
    return {OVERRIDES_KEY: json.dumps([]), CONFIG_KEY: OmegaConf.to_yaml(config)}


@pytest.mark.parametrize("set_key, value, named", [
    ("autoencoder._target_", "os.system", "autoencoder._target_='os.system'"),
    ("autoencoder._target_", "builtins.exec", "autoencoder._target_='builtins.exec'"),
    # a path through one of our modules to a function or class defined elsewhere
    ("autoencoder._target_", "models.autoencoder.torch.load", "autoencoder._target_="),
    ("autoencoder._target_", "models.dit.nn.Linear", "autoencoder._target_="),
    # the saved values may not add an encoder the overrides did not compose
    ("text.encoders.evil", {"_target_": "subprocess.getoutput", "cmd": "touch pwned"},
     "at text.encoders.evil"),
])
def test_a_crafted_saved_config_is_refused(monkeypatch, set_key, value, named):
    called = []
    monkeypatch.setattr(os, "system", lambda *args, **kwargs: called.append(args))
    with pytest.raises(ConfigError) as error:
        config_from_metadata(crafted(set_key, value))
    assert named in str(error.value) and "\n" not in str(error.value)
    assert called == []


def test_a_crafted_override_adding_an_encoder_is_refused():
    # text.encoders takes any name: an encoder smuggled in beside the real one
    metadata = crafted("run_name", "t2v_tiny")
    metadata[OVERRIDES_KEY] = json.dumps([
        "+text.encoders.evil._target_=subprocess.getoutput", "+text.encoders.evil.cmd=id"])
    with pytest.raises(ConfigError, match=r"text\.encoders\.evil\._target_="
                                          r"'subprocess\.getoutput' is not a class"):
        config_from_metadata(metadata)


def test_every_target_of_the_shipped_configs_is_allowed():
    for overrides in ([], ["experiment=tae_tiny"], ["text=minilm"]):
        metadata = launch_metadata(compose_train(overrides))
        metadata[OVERRIDES_KEY] = json.dumps(overrides)  # what Hydra saved in .hydra/
        config_from_metadata(metadata)


def test_the_cli_refuses_a_crafted_run_dir_with_a_message(tmp_path):
    run_dir = tmp_path / "shared_run"
    (run_dir / ".hydra").mkdir(parents=True)
    metadata = crafted("autoencoder._target_", "os.system")
    (run_dir / ".hydra" / "config.yaml").write_text(metadata[CONFIG_KEY])
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    write_manifest(step, 1, {})
    result = subprocess.run(python_cmd("trainer.export", f"checkpoint={run_dir}",
                                       f"output={tmp_path / 'x.safetensors'}"),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert ("config error: autoencoder._target_='os.system' is not a class of this "
            "project") in result.stderr
