"""``trainer.init_from``: a grown position table keeps the trained rows and takes the
fresh init for new ones, misfits fail naming the tensor (and both shapes) unless allowed,
an FSDP mesh loads what one process loads, and the real CLI starts a fresh run (step 0)
from a run dir, a step dir and an averaged safetensors file, or resumes its own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import compose_train, python_cmd
from tests.distributed import run_distributed
from tests.test_parallel_equivalence import BASE, full
from tests.test_train_e2e import QUIET, run, train_cmd

GROWN = ["model.max_patches_t=20", "model.max_patches_h=24"]


def source_file(path, overrides=()) -> dict[str, torch.Tensor]:
    """A source model's weights made unlike any fresh init (noise added), saved to ``path``."""
    from trainer.build import build_model, single_process

    model = build_model(compose_train(BASE + list(overrides)), single_process(torch.device("cpu")))
    noise = torch.Generator().manual_seed(5)
    tensors = {name: value + torch.randn(value.shape, generator=noise)
               for name, value in model.state_dict().items()}
    save_file(tensors, str(path))
    return tensors


def fresh_and_loaded(overrides) -> tuple[dict, dict]:
    """Full weights of a fresh model and of the same model after ``initialise_from``."""
    from trainer.build import build_model
    from trainer.init_from import initialise_from
    from trainer.train import start_parallel

    cfg = compose_train(BASE + overrides)
    ctx = start_parallel(cfg)
    model = build_model(cfg, ctx)
    fresh = {name: full(value).clone() for name, value in model.state_dict().items()}
    initialise_from(cfg, model, None, ctx.is_main)
    return fresh, {name: full(value) for name, value in model.state_dict().items()}


def test_grown_position_table_keeps_trained_rows_and_new_rows_are_fresh_init(tmp_path):
    source = source_file(tmp_path / "small.safetensors")
    fresh, loaded = fresh_and_loaded([*GROWN, f"trainer.init_from={tmp_path}/small.safetensors"])
    assert loaded.keys() == source.keys()
    for name, value in loaded.items():
        rows = source[name].shape[0] if source[name].dim() else 0
        if name in ("dit.pos_embed.t", "dit.pos_embed.h"):
            assert value.shape[0] > rows
            assert torch.equal(value[:rows], source[name]), name
            assert torch.equal(value[rows:], fresh[name][rows:]), name
        else:
            assert torch.equal(value, source[name]), name


def _loaded_on_mesh(overrides):
    return fresh_and_loaded(overrides)[1]


def test_fsdp_mesh_loads_a_checkpoint_like_one_process(tmp_path):
    from tests.test_parallel_checkpoint import train_and_save

    saved = train_and_save([], tmp_path / "run" / "checkpoints")  # a trained step-2 checkpoint
    overrides = [*GROWN, f"trainer.init_from={tmp_path}/run"]
    one = fresh_and_loaded(overrides)[1]
    for name, value in one.items():
        expected = saved["ema"].get(name, saved["weights"][name])
        assert torch.equal(value[: expected.shape[0]], expected), name
    for rank, loaded in enumerate(run_distributed(_loaded_on_mesh, 2,
                                                  [*overrides, "parallel.dp_shard=2"])):
        for name, value in one.items():
            assert torch.equal(loaded[name], value), f"rank {rank} {name}"


@pytest.mark.parametrize("target,match", [
    (["model.ffn_dim=64"], r"dit.blocks.0.ffn.w1.weight has shape \(48, 32\) in \S+ but "
                           r"\(64, 32\) in the model.*only position tables grow"),
    (["model.max_patches_h=8"], r"dit.pos_embed.h has shape \(16, 32\) in \S+ but \(8, 32\) "
                                r"in the model"),
])
def test_other_shapes_fail_naming_the_parameter_and_both_shapes(tmp_path, target, match):
    from trainer.config import ConfigError

    source_file(tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=f"^trainer.init_from=\\S+ does not fit this model: "
                                          f"{match}"):
        fresh_and_loaded([*target, f"trainer.init_from={tmp_path}/w.safetensors"])


def test_missing_or_unexpected_tensors_fail_unless_allowed(tmp_path):
    from trainer.config import ConfigError

    tensors = source_file(tmp_path / "w.safetensors")
    del tensors["dit.final.proj.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    save_file({**tensors, "dit.final.proj.weight": torch.ones(1), "dit.extra": torch.ones(2)},
              str(tmp_path / "extra.safetensors"))
    for name, match in (("missing", "1 model tensors missing from \\S+: dit.final.proj.weight"),
                        ("extra", "1 tensors of \\S+ not in the model: dit.extra")):
        with pytest.raises(ConfigError, match=f"{match}.*trainer.init_allow_missing"):
            fresh_and_loaded([f"trainer.init_from={tmp_path}/{name}.safetensors"])
    fresh, loaded = fresh_and_loaded([f"trainer.init_from={tmp_path}/missing.safetensors",
                                      "trainer.init_allow_missing=[dit.final.*,dit.extra]"])
    assert torch.equal(loaded["dit.final.proj.weight"], fresh["dit.final.proj.weight"])
    assert all(torch.equal(loaded[name], value) for name, value in tensors.items())


def test_bad_source_paths_are_config_errors(tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.init_from=\S+/nope does not exist"):
        fresh_and_loaded([f"trainer.init_from={tmp_path}/nope"])
    with pytest.raises(ConfigError, match=r"trainer.init_from=\S+ has no intact checkpoint"):
        fresh_and_loaded([f"trainer.init_from={tmp_path}"])


def _weights(checkpoint, ema: bool) -> dict[str, torch.Tensor]:
    """A run's weights as ``trainer.sample`` loads them (DCP + EMA swap): the reference."""
    from trainer.trained import load_run

    return {n: v.detach().clone() for n, v in
            load_run(checkpoint, torch.device("cpu"), ema).model.state_dict().items()}


@pytest.mark.slow
def test_cli_starts_fresh_runs_from_a_run_dir_a_step_dir_and_an_averaged_file(tmp_path):
    source = tmp_path / "source"
    run(train_cmd(source, *QUIET, "trainer.max_steps=2", "trainer.ckpt_every=1"))
    step1 = source / "checkpoints" / "step_00000001"
    averaged = tmp_path / "avg.safetensors"
    run(python_cmd("trainer.average", f"checkpoints=[{source},{step1}]",
                   "weights=[3,1]", f"output={averaged}", "ema=false"))
    train2, train1 = _weights(source, ema=False), _weights(step1, ema=False)
    # the average carries its source's config: sample and export read the file alone
    from trainer.export import ExportConfig, export
    from trainer.sample import SampleConfig, sample

    from_file, in_file = _weights(averaged, ema=True), load_file(averaged)
    assert from_file.keys() == in_file.keys()
    assert all(torch.equal(from_file[n], v) for n, v in in_file.items())
    videos = sample(SampleConfig(checkpoint=str(averaged), prompt="a red square", steps=2))
    assert [v.parent for v in videos] == [tmp_path / "samples" / "cli"]
    exported = export(ExportConfig(checkpoint=str(averaged), output=str(tmp_path / "e.st")))
    assert all(torch.equal(load_file(exported)[n], v) for n, v in in_file.items())
    assert safe_open(str(exported), "pt").metadata()["sources"] == json.dumps(
        [str(source / "checkpoints" / "step_00000002"), str(step1)])
    cases = {  # run name: (overrides, the weights it must start from)
        "from_run": ([f"trainer.init_from={source}"], _weights(source, ema=True)),
        "from_step": ([f"trainer.init_from={step1}", "trainer.init_ema=false",
                       "model.max_patches_h=24"], train1),
        "from_file": ([f"trainer.init_from={averaged}"],
                      {n: (3 * train2[n] + train1[n]) / 4 for n in train2}),
    }
    for name, (overrides, expected) in cases.items():
        # lr 1e-30: the first step moves no weight by more than ~1e-30, so the step-1
        # checkpoint shows what the run started from (weights and EMA)
        result = run(train_cmd(tmp_path / name, *QUIET, "trainer.max_steps=1",
                               "recipe.lr=1e-30", *overrides))
        assert "initialised from" in result.stdout and "resumed" not in result.stdout
        steps = [json.loads(line)["step"] for line in open(tmp_path / name / "metrics.jsonl")
                 if json.loads(line)["kind"] == "train"]
        assert steps == [1], name
        for ema in (False, True):
            started = _weights(tmp_path / name, ema)
            assert started.keys() == expected.keys()
            for key, value in expected.items():
                rows = slice(0, value.shape[0]) if value.dim() else ...
                torch.testing.assert_close(started[key][rows], value, rtol=1e-6, atol=1e-20,
                                           msg=f"{name} ema={ema} {key}")
    # the same command again resumes the run's own checkpoint and says init_from is ignored
    result = run(train_cmd(tmp_path / "from_run", *QUIET, "trainer.max_steps=2",
                           "recipe.lr=1e-30", f"trainer.init_from={source}"))
    assert "trainer.init_from" in result.stdout and "ignored" in result.stdout
    assert "resumed from" in result.stdout and "initialised from" not in result.stdout
