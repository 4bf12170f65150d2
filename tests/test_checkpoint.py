import pytest
import torch

from parallel.checkpoint import MANIFEST_FILE, Checkpointer

STATE_FILE = "state.pt"


def state(step):
    return {"step": step, "weights": torch.full((64,), float(step))}


def writer(step):
    return lambda directory: torch.save(state(step), directory / STATE_FILE)


def load_latest(ckpt):
    path = ckpt.latest()
    return None if path is None else (path, torch.load(path / STATE_FILE))


def test_save_load_and_keep_last(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ckpt.save(step, writer(step))
    assert [p.name for p in ckpt.step_dirs()] == ["step_00000030", "step_00000020"]
    path, loaded = load_latest(ckpt)
    assert path.name == "step_00000030" and torch.equal(loaded["weights"], state(30)["weights"])


def test_empty_directory_means_fresh_run(tmp_path):
    assert Checkpointer(tmp_path / "none", keep_last=1).latest() is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_manifest", "bad_manifest"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage, caplog):
    ckpt = Checkpointer(tmp_path, keep_last=3)
    ckpt.save(1, writer(1))
    latest = ckpt.save(2, writer(2))
    data = (latest / STATE_FILE).read_bytes()
    if damage == "truncate":
        (latest / STATE_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        (latest / STATE_FILE).write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    elif damage == "drop_manifest":
        (latest / MANIFEST_FILE).unlink()
    else:
        (latest / MANIFEST_FILE).write_text("{not json")
    path, loaded = load_latest(ckpt)
    assert loaded["step"] == 1 and path.name == "step_00000001"
    assert "skipping damaged checkpoint" in caplog.text and "step_00000002" in caplog.text


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, writer(1))
    real_save = torch.save

    def dies_halfway(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as handle:
            handle.truncate(10)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, writer(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt.step_dirs()] == ["step_00000001"]
    assert load_latest(ckpt)[1]["step"] == 1
    ckpt.save(3, writer(3))  # the next save clears the half-written directory
    assert not list(tmp_path.glob(".tmp-*"))
    assert load_latest(ckpt)[1]["step"] == 3
