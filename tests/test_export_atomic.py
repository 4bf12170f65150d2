"""trainer.export publishes its safetensors file whole or not at all: a write that fails
before the rename leaves the earlier file as it was and no temporary file behind."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.conftest import compose_train
from trainer.export import ExportConfig, export
from trainer.train import train

TINY = ["model.depth=1", "model.width=32", "model.heads=2", "model.ffn_dim=64",
        "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
        "text.encoders.byte.ffn_dim=64", "model=dit_tiny", "data.frames=2",
        "data.height=8", "data.width=8",
        "data.num_samples=16", "data.val_samples=0", "data.judge_prompts=0",
        "recipe.batch_size=2", "trainer.max_steps=1", "trainer.sample_prompts=[]",
        "trainer.wandb.mode=disabled", "trainer.progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    train(compose_train(TINY), directory, {})
    return directory


def test_export_writes_the_whole_file_and_leaves_no_temporary(run_dir, tmp_path):
    output = export(ExportConfig(checkpoint=str(run_dir),
                                 output=str(tmp_path / "m.safetensors")))
    assert any(name.startswith("dit.blocks.0.") for name in load_file(output))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_failed_export_keeps_the_earlier_file(run_dir, tmp_path, monkeypatch):
    output = tmp_path / "m.safetensors"
    output.write_bytes(b"the earlier export")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("parallel.weights.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(ExportConfig(checkpoint=str(run_dir), output=str(output)))
    assert output.read_bytes() == b"the earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
