"""``trainer.average``: exact means of real checkpoints and safetensors files, the refusals,
and a streamed write that leaves nothing behind when it fails. (Checkpoints written at
dp2 and tp2×cp2: tests/test_parallel_checkpoint.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_parallel_checkpoint import train_and_save


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-process run directory with a step-2 checkpoint, and its full tensors."""
    root = tmp_path_factory.mktemp("average")
    snapshot = train_and_save([], root / "run" / "checkpoints")
    weights = {"ema": {name: snapshot["ema"].get(name, value)
                       for name, value in snapshot["weights"].items()},
               "train": snapshot["weights"]}
    return root / "run", weights


def average(*argv: str) -> None:
    from trainer.average import main

    main(list(argv))


def test_two_copies_average_to_it_bit_for_bit(run, tmp_path):
    run_dir, weights = run
    step_dir = run_dir / "checkpoints" / "step_00000002"
    for ema, kind in (("true", "ema"), ("false", "train")):
        output = tmp_path / f"{kind}.safetensors"
        average(f"checkpoints=[{run_dir},{step_dir}]", f"output={output}", f"ema={ema}")
        averaged = load_file(output)
        assert averaged.keys() == weights[kind].keys()
        for name, value in weights[kind].items():
            assert torch.equal(averaged[name], value), f"{kind} {name}"
        metadata = safe_open(str(output), "pt").metadata()
        assert metadata["weights"] == kind and metadata["average_weights"] == "[1.0, 1.0]"
    # written through a temporary file, renamed: nothing else is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "train.safetensors"]


def test_a_checkpoint_and_its_negation_average_to_zero(run, tmp_path):
    run_dir, weights = run
    negated = tmp_path / "negated.safetensors"  # written independently of our writer
    save_file({name: -value for name, value in weights["ema"].items()}, str(negated))
    output = tmp_path / "zero.safetensors"
    average(f"checkpoints=[{run_dir},{negated}]", f"output={output}")
    averaged = load_file(output)
    assert averaged.keys() == weights["ema"].keys()
    for name, value in averaged.items():
        assert torch.equal(value, torch.zeros_like(value)), name
    # weighted: (1 θ + 3 (-θ)) / 4 = -θ / 2
    average(f"checkpoints=[{run_dir},{negated}]", "weights=[1,3]", f"output={output}")
    for name, value in load_file(output).items():
        torch.testing.assert_close(value, -weights["ema"][name] / 2, rtol=1e-6, atol=0)


def _edited(run, tmp_path, edit) -> str:
    tensors = dict(run[1]["ema"])
    edit(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("argv,match", [
    (["checkpoints=[RUN]"], r"checkpoints=\['\S+/run'\] names one checkpoint; averaging "
                            r"needs two or more"),
    (["checkpoints=RUN"], r"checkpoints=\S+/run names one checkpoint"),
    (["checkpoints=[RUN,RUN]", "weights=[1]"], r"weights=\[1\] must be a list of one number "
                                               r"per checkpoint \(2\)"),
    (["checkpoints=[RUN,RUN]", "weights=[1,-1]"], r"weights=\[1, -1\] must be finite and "
                                                  r"must not sum to 0"),
    (["checkpoints=[RUN,DROPPED]"], r"hold different tensors: 1 only in the first: "
                                    r"dit.final.proj.weight"),
    (["checkpoints=[RUN,EXTRA]"], r"1 only in the second: dit.extra"),
    (["checkpoints=[RUN,RESHAPED]"], r"dit.pos_embed.h has shape \(16, 32\) in the first but "
                                     r"\(8, 32\) in the second"),
    (["checkpoints=[RUN,RUN/nothing]"], r"checkpoints\[1\]=\S+/nothing has no intact "
                                        r"checkpoint"),
])
def test_refusals_name_the_cause(run, tmp_path, argv, match):
    edits = {"DROPPED": lambda t: t.pop("dit.final.proj.weight"),
             "EXTRA": lambda t: t.update({"dit.extra": torch.ones(2)}),
             "RESHAPED": lambda t: t.update({"dit.pos_embed.h": t["dit.pos_embed.h"][:8]})}
    for token, edit in edits.items():
        if any(token in arg for arg in argv):
            argv = [arg.replace(token, _edited(run, tmp_path, edit)) for arg in argv]
    argv = [arg.replace("RUN", str(run[0])) for arg in argv]
    output = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit, match=f"^config error: .*{match}"):
        average(*argv, f"output={output}")
    assert not output.exists()


def test_deepspeed_checkpoint_is_refused_with_the_way_round(tmp_path):
    from parallel.checkpoint import Checkpointer

    def write_deepspeed_layout(directory):
        (directory / "deepspeed").mkdir()
        (directory / "deepspeed" / "x.pt").write_bytes(b"x")

    run_dir = tmp_path / "ds"
    Checkpointer(run_dir / "checkpoints", 1).save(3, write_deepspeed_layout)
    with pytest.raises(SystemExit, match=r"is a DeepSpeed checkpoint.*python -m trainer.export "
                                         r"checkpoint=\S+step_00000003 output="):
        average(f"checkpoints=[{run_dir},{run_dir}]", f"output={tmp_path / 'out.safetensors'}")


def test_streamed_write_is_atomic(tmp_path):
    from parallel.weights import write_safetensors

    specs = {"a": (torch.Size([2, 3]), torch.float32), "b": (torch.Size([4]), torch.bfloat16),
             "c": (torch.Size([]), torch.int64)}
    values = {"a": torch.randn(2, 3), "b": torch.randn(4).bfloat16(), "c": torch.tensor(7)}
    path = write_safetensors(tmp_path / "x.safetensors", specs, values.__getitem__, {"k": "v"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], v) and loaded[n].dtype == v.dtype
               for n, v in values.items())
    assert safe_open(str(path), "pt").metadata() == {"k": "v"}

    def failing(name):
        if name == "b":
            raise OSError("disk gone")
        return values[name]

    with pytest.raises(OSError, match="disk gone"):
        write_safetensors(tmp_path / "y.safetensors", specs, failing, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
