import json

import pytest
import torch

from parallel.checkpoint import MANIFEST_FILE, Checkpointer
from parallel.manifest import balanced_shares

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


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_keep_last_counts_only_intact_checkpoints(tmp_path, damage):
    """A damaged newer step_N (here: the run resumed from step 20 because step 30 is
    broken) must not push the good checkpoints out: it counts for nothing."""
    first = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        first.save(step, writer(step))
    broken = tmp_path / "step_00000030" / STATE_FILE
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncate"
                       else data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    resumed = Checkpointer(tmp_path, keep_last=2)
    assert load_latest(resumed)[1]["step"] == 20
    resumed.save(25, writer(25))
    assert [p.name for p in resumed.step_dirs()] == ["step_00000025", "step_00000020"]
    resumed.save(26, writer(26))
    assert [p.name for p in resumed.step_dirs()] == ["step_00000026", "step_00000025"]
    assert load_latest(Checkpointer(tmp_path, keep_last=2))[1]["step"] == 26


def test_keep_steps_survive_rotation_and_damage_elsewhere(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.keep_steps = {1}
    for step in (1, 2, 3):
        ckpt.save(step, writer(step))
    assert [p.name for p in ckpt.step_dirs()] == ["step_00000003", "step_00000001"]


def test_manifest_lists_every_file_whoever_claims_it(tmp_path):
    """Files a writer claims are hashed by its rank; unclaimed ones by an even split:
    the manifest is the same either way."""
    def claiming(directory):
        torch.save(state(1), directory / STATE_FILE)
        (directory / "extra").mkdir()
        (directory / "extra" / "other.bin").write_bytes(b"x" * 100)
        return [directory / STATE_FILE]

    claimed = Checkpointer(tmp_path / "a", keep_last=1).save(1, claiming)
    unclaimed = Checkpointer(tmp_path / "b", keep_last=1).save(
        1, lambda directory: claiming(directory) and None)
    manifests = [json.loads((p / MANIFEST_FILE).read_text()) for p in (claimed, unclaimed)]
    assert manifests[0] == manifests[1]
    assert sorted(manifests[0]["files"]) == ["extra/other.bin", STATE_FILE]
    assert Checkpointer.verify(claimed) is None


def test_balanced_shares_split_bytes_evenly_and_deterministically():
    sizes = {f"f{i}": size for i, size in enumerate([100, 90, 50, 40, 30, 10, 10])}
    shares = balanced_shares(sizes, 3)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= 20
    assert shares == balanced_shares(dict(reversed(sizes.items())), 3)
    assert balanced_shares({}, 2) == [[], []]


def test_async_save_in_one_process_publishes_the_saved_step_after_the_write(tmp_path):
    """dcp.async_save copies the state before returning: later updates do not reach the
    checkpoint, which is published (manifest, rename) only by ``wait``."""
    from parallel.checkpoint import load_training_state, save_training_state

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {"weight": saved["weight"].clone()}
    ckpt = Checkpointer(tmp_path, keep_last=1)
    final = ckpt.save(1, lambda d: save_training_state(d, model, optimizer, ema,
                                                       {"step": 1}, asynchronous=True))
    assert not final.exists()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
        ema["weight"].add_(1.0)
    assert ckpt.wait() == final and Checkpointer.verify(final) is None
    assert ckpt.wait() is None  # nothing pending any more
    fresh = torch.nn.Linear(4, 3)
    fresh_ema = {"weight": torch.zeros(3, 4)}
    assert load_training_state(final, fresh, None, fresh_ema) == {"step": 1}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(fresh_ema["weight"], saved["weight"])
