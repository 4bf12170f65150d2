"""Resuming with changed settings: the LR and schedule, the step budget and the like are
applied (a lowered recipe.lr too) and listed in the log and the wandb config; the
architecture, the data and its order, the seed and the loss are refused naming the key
and both values unless trainer.force=true; trainer.export reads the config stored with
the checkpoint, not the latest launch's."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open

from tests.conftest import ROOT, compose_train, python_cmd
from tests.test_train_e2e import TINY, run, train_cmd
from trainer.config import ConfigError
from trainer.optim import build_optimizer, lr_factor
from trainer.resume_settings import check_resume, launch_metadata
from trainer.run_config import CONFIG_KEY, write_checkpoint_config


def stepped(recipe, steps, max_steps=20):
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model.parameters(), recipe, max_steps)
    for _ in range(steps):
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_a_lowered_lr_takes_effect_after_loading_the_schedule():
    old = compose_train(["recipe.lr=1e-3", "recipe.warmup_steps=2"]).recipe
    new = compose_train(["recipe.lr=1e-5", "recipe.warmup_steps=2", "recipe.betas=[0.8,0.9]",
                         "recipe.weight_decay=0.1"]).recipe
    _, optimizer, scheduler = stepped(old, 5)
    model = torch.nn.Linear(2, 2)
    resumed_optimizer, resumed = build_optimizer(model.parameters(), new, 20)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    # torch's own scheduler state carries the old base LR: what made the bug
    plain = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda step: 1.0)
    plain.load_state_dict(scheduler.state_dict())
    assert plain.base_lrs == [1e-3]
    resumed.load_state_dict(scheduler.state_dict())
    expected = 1e-5 * lr_factor(5, 2, 20, new.schedule, new.min_lr_ratio)
    assert resumed.get_last_lr() == [expected]
    group = resumed_optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (expected, (0.8, 0.9), 0.1)
    resumed.step()
    assert resumed.get_last_lr() == [1e-5 * lr_factor(6, 2, 20, new.schedule,
                                                      new.min_lr_ratio)]


def test_an_unchanged_recipe_resumes_at_the_same_lr_bitwise():
    recipe = compose_train(["recipe.lr=3e-4", "recipe.warmup_steps=3"]).recipe
    _, optimizer, scheduler = stepped(recipe, 7)
    resumed_optimizer, resumed = build_optimizer(torch.nn.Linear(2, 2).parameters(), recipe,
                                                 20)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def checkpoint_of(tmp_path, overrides):
    """A checkpoint directory holding only the stored config of ``overrides``."""
    directory = tmp_path / "checkpoints" / "step_00000010"
    directory.mkdir(parents=True)
    write_checkpoint_config(directory, launch_metadata(compose_train(overrides)))
    return directory


def test_a_fresh_run_has_nothing_to_compare():
    assert check_resume(compose_train(["model.depth=2"]), None) == []


def test_changed_settings_are_applied_or_refused(tmp_path):
    checkpoint = checkpoint_of(tmp_path, ["recipe.lr=1e-3", "trainer.max_steps=10"])
    changes = check_resume(compose_train(["recipe.lr=1e-5", "trainer.max_steps=50",
                                          "parallel.tp=2", "data.val_samples=16",
                                          "data.num_workers=0"]),
                           checkpoint)
    assert changes == ["data.num_workers=0 (the checkpoint: 2)",
                       "data.val_samples=16 (the checkpoint: 64)",
                       "parallel.tp=2 (the checkpoint: 1)",
                       "recipe.lr=1e-05 (the checkpoint: 0.001)",
                       "trainer.max_steps=50 (the checkpoint: 10)"]
    for overrides, named in [
            (["model.depth=2"], "model.depth=2 (the checkpoint: model.depth=4)"),
            (["model.width=64", "model.heads=4"], "model.width=64 (the checkpoint: "
                                                  "model.width=128)"),
            (["data.seed=3"], "data.seed=3 (the checkpoint: data.seed=0)"),
            (["trainer.seed=1"], "trainer.seed=1 (the checkpoint: trainer.seed=0)"),
            (["recipe.batch_size=4"], "recipe.batch_size=4 (the checkpoint: "
                                      "recipe.batch_size=8)"),
            (["recipe.caption_dropout=0.5"], "recipe.caption_dropout=0.5"),
            (["text.encoders.byte.dim=64"], "text.encoders.byte.dim=64"),
            (["autoencoder.space_to_depth=1", "model.in_channels=3"],
             "autoencoder.space_to_depth=1 (the checkpoint: autoencoder.space_to_depth=2)"),
            (["parallel=deepspeed"], "parallel.engine='deepspeed' (the checkpoint: "
                                     "parallel.engine='fsdp2')")]:
        cfg = compose_train(["recipe.lr=1e-3", "trainer.max_steps=10", *overrides])
        with pytest.raises(ConfigError) as error:
            check_resume(cfg, checkpoint)
        message = str(error.value)
        assert named in message and "trainer.force=true" in message, message
        assert "\n" not in message
        forced = compose_train(["recipe.lr=1e-3", "trainer.max_steps=10",
                                "trainer.force=true", *overrides])
        assert f"forced {named.split(' (')[0]}" in check_resume(forced, checkpoint)[0] \
            or any(line.startswith(f"forced {named.split(' (')[0]}")
                   for line in check_resume(forced, checkpoint)), overrides


def test_a_key_added_since_the_checkpoint_is_listed_not_refused(tmp_path):
    checkpoint = checkpoint_of(tmp_path, [])
    path = checkpoint / "run_config.json"
    stored = json.loads(path.read_text())
    stored[CONFIG_KEY] = stored[CONFIG_KEY].replace("  force: false\n", "")
    path.write_text(json.dumps(stored))
    assert check_resume(compose_train([]), checkpoint) == [
        "trainer.force=False (the checkpoint: unset)"]


LR_RUN = [*TINY, "recipe.schedule=constant", "recipe.warmup_steps=1", "trainer.ckpt_every=3",
          "trainer.sample_prompts=[]", "data.judge_prompts=0", "trainer.val_every=100"]


def lrs(run_dir):
    return {r["step"]: r["lr"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if r["kind"] == "train"}


@pytest.mark.slow
def test_resume_cli_lowers_the_lr_refuses_a_new_depth_and_export_keeps_the_trained_config(
        tmp_path):
    run_dir = tmp_path / "run"
    run(python_cmd("trainer.train", f"hydra.run.dir={run_dir}", *LR_RUN,
                   "trainer.max_steps=3", "trainer.wandb.mode=disabled"))
    result = run(python_cmd("trainer.train", f"hydra.run.dir={run_dir}", *LR_RUN,
                            "trainer.max_steps=5", "recipe.lr=1e-5"))
    assert ("resumed with changed settings: recipe.lr=1e-05 (the checkpoint: 0.001); "
            "trainer.max_steps=5 (the checkpoint: 3)") in result.stdout
    assert lrs(run_dir) == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-5, 5: 1e-5}
    wandb_run = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"resume_changes" in wandb_run and b"recipe.lr=1e-05" in wandb_run

    refused = subprocess.run(train_cmd(run_dir, *LR_RUN[len(TINY):], "trainer.max_steps=7",
                                       "recipe.lr=1e-5", "model.depth=1"),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    line = next(line for line in refused.stderr.splitlines() if "config error" in line)
    assert "model.depth=1 (the checkpoint: model.depth=2)" in line, refused.stderr
    assert max(lrs(run_dir)) == 5  # refused before a step

    # the run dir's .hydra now holds the refused launch (depth 1); export reads the config
    # stored with the checkpoint
    weights = tmp_path / "model.safetensors"
    run(python_cmd("trainer.export", f"checkpoint={run_dir}", f"output={weights}"))
    with safe_open(str(weights), "pt") as file:
        metadata = file.metadata()
        names = list(file.keys())
    assert "depth: 2" in metadata[CONFIG_KEY] and "lr: 1.0e-05" in metadata[CONFIG_KEY]
    assert "model.depth=1" not in metadata["hydra_overrides"]
    assert any(name.startswith("dit.blocks.1.") for name in names)


def test_loader_workers_may_change_for_synthetic_clips_not_for_shards(tmp_path):
    """Synthetic clips come in the sampler's order however many workers build them; shards
    are dealt to the workers, so their count is part of the saved data position."""
    shards = ["data=webdataset", "data.num_workers=2"]
    checkpoint = checkpoint_of(tmp_path, shards)
    with pytest.raises(ConfigError, match=r"data.num_workers=4 \(the checkpoint: "
                                          r"data.num_workers=2\)"):
        check_resume(compose_train(["data=webdataset", "data.num_workers=4"]), checkpoint)
    synthetic = checkpoint_of(tmp_path / "synthetic", ["data.num_workers=2"])
    assert check_resume(compose_train(["data.num_workers=0"]), synthetic) == [
        "data.num_workers=0 (the checkpoint: 2)"]
