"""DCP checkpoints reshard: what one mesh saves, another loads bit for bit (model,
optimizer moments, EMA), and a model trained on a mesh exports to one safetensors file;
checkpoints of any mesh average (``trainer.average``) like one process's."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from parallel.checkpoint import MANIFEST_FILE
from tests.distributed import run_distributed
from tests.test_parallel_equivalence import BASE, full

FULL = StateDictOptions(full_state_dict=True)


def build(overrides):
    from parallel.engine import NativeEngine
    from tests.conftest import compose_train
    from trainer.build import build_model
    from trainer.ema import EMA
    from trainer.optim import build_optimizer
    from trainer.train import start_parallel

    cfg = compose_train(BASE + overrides)
    ctx = start_parallel(cfg)
    model = build_model(cfg, ctx)
    engine = NativeEngine(model, lambda p: build_optimizer(p, cfg.recipe, 10))
    return engine, EMA(engine.ema_tensors(), 0.5)


def snapshot(engine, ema) -> dict:
    """Full (unsharded) weights, AdamW state and EMA, identical on every rank."""
    optimizer = get_optimizer_state_dict(engine.module, engine.optimizer, options=FULL)
    return {"weights": {n: full(p) for n, p in engine.module.named_parameters()},
            "optimizer": {name: {k: full(v) for k, v in state.items()}
                          for name, state in optimizer["state"].items()},
            "ema": {n: full(t) for n, t in ema.shadow.items()}}


def train_and_save(overrides, directory):
    from parallel.checkpoint import Checkpointer, save_training_state

    engine, ema = build(overrides)
    for _ in range(2):  # two steps with gradients that are a function of the weights
        engine.zero_grad()
        for param in engine.params:
            param.grad = param.detach() * 0.1 + 0.01
        engine.clip_and_step(float("inf"), lambda norm: True)
        ema.update(1000)
    Checkpointer(directory, keep_last=1).save(2, lambda d: save_training_state(
        d, engine.module, engine.optimizer, ema.state_dict(), {"step": 2}))
    return snapshot(engine, ema)


def load(overrides, directory):
    from parallel.checkpoint import Checkpointer, load_training_state

    engine, ema = build(overrides)
    path = Checkpointer(directory, keep_last=1).latest()
    assert load_training_state(path, engine.module, engine.optimizer, ema.state_dict()) == {
        "step": 2}
    return snapshot(engine, ema)


def assert_equal_snapshots(a: dict, b: dict, where: str) -> None:
    for kind in ("weights", "ema"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), f"{where} {kind} {name}"
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for name in a["optimizer"]:
        for key, value in a["optimizer"][name].items():
            assert torch.equal(value, b["optimizer"][name][key]), f"{where} adam {name} {key}"


def test_save_at_tp2_cp2_load_at_dp2_and_one_process(tmp_path):
    checkpoints = tmp_path / "tp2cp2" / "checkpoints"
    saved = run_distributed(train_and_save, 4, ["parallel.tp=2", "parallel.cp=2"], checkpoints)
    for other in saved[1:]:
        assert_equal_snapshots(saved[0], other, "ranks agree")
    for rank, loaded in enumerate(run_distributed(load, 2, ["parallel.dp_shard=2"],
                                                  checkpoints)):
        assert_equal_snapshots(loaded, saved[0], f"dp2 rank {rank}")
    assert_equal_snapshots(load([], checkpoints), saved[0], "one process")

    # trainer.average reads any mesh's checkpoint tensor by tensor: the tp2×cp2 and a dp2
    # checkpoint average exactly like two of one process's, and to the snapshots' mean
    run_distributed(train_and_save, 2, ["parallel.dp_shard=2"], tmp_path / "dp2" / "checkpoints")
    train_and_save([], tmp_path / "one" / "checkpoints")
    for ema, kind in ((True, "ema"), (False, "weights")):
        mesh, one = (average_of(tmp_path, runs, ema) for runs in (("tp2cp2", "dp2"),
                                                                  ("one", "one")))
        assert mesh.keys() == saved[0]["weights"].keys()
        for name, value in mesh.items():
            assert torch.equal(value, one[name]), f"{kind} {name}"
            expected = saved[0][kind].get(name, saved[0]["weights"][name])
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9)


def average_of(root, runs, ema):
    from safetensors.torch import load_file

    from trainer.average import AverageConfig, average

    output = root / f"{'_'.join(runs)}_{ema}.safetensors"
    average(AverageConfig(checkpoints=[str(root / run) for run in runs], weights=[1, 3],
                          output=str(output), ema=ema))
    return load_file(output)


def in_checkpoint(path) -> str:
    """A file's path inside its (temporary or published) step directory."""
    parts = path.parts
    step = next(i for i, part in enumerate(parts) if part.startswith((".tmp-step_", "step_")))
    return "/".join(parts[step + 1:])


def hashed_by_rank(overrides, directory, asynchronous):
    """Save (synchronously or with dcp.async_save) then resume: which files this rank
    hashed at save and at resume, and whether training went on while the write ran."""
    import torch.distributed as dist

    import parallel.manifest
    from parallel.checkpoint import Checkpointer, load_training_state, save_training_state

    hashed = []
    real = parallel.manifest.sha256

    def recording(path):
        hashed.append(in_checkpoint(path))
        return real(path)

    parallel.manifest.sha256 = recording
    engine, ema = build(overrides)
    engine.zero_grad()
    for param in engine.params:  # one AdamW step, so there are moments to save
        param.grad = param.detach() * 0.1 + 0.01
    engine.clip_and_step(float("inf"), lambda norm: True)
    checkpointer = Checkpointer(directory, keep_last=2)
    saved = snapshot(engine, ema)
    final = checkpointer.save(1, lambda d: save_training_state(
        d, engine.module, engine.optimizer, ema.state_dict(), {"step": 1}, asynchronous))
    published_early = final.exists()
    for param in engine.params:  # the next step changes every weight during the write
        with torch.no_grad():
            param.add_(1.0)
    checkpointer.wait()
    at_save, hashed[:] = list(hashed), []
    engine, ema = build(overrides)
    path = Checkpointer(directory, keep_last=2).latest()
    load_training_state(path, engine.module, engine.optimizer, ema.state_dict())
    return {"rank": dist.get_rank(), "at_save": at_save, "at_resume": list(hashed),
            "published_early": published_early, "saved": saved,
            "loaded": snapshot(engine, ema)}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_each_rank_hashes_its_own_files_and_async_saves_publish_after_the_write(
        tmp_path, asynchronous):
    """Each rank fsyncs and hashes the DCP shards it wrote (rank 0 also the metadata and
    trainer state); the manifest is the union; resume splits the checking by bytes. An
    asynchronous save returns before it is published, keeps the weights of the step that
    saved it while training changes them, and is published whole once written."""
    results = run_distributed(hashed_by_rank, 2, ["parallel.dp_shard=2"],
                              tmp_path / "checkpoints", asynchronous)
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000001" / MANIFEST_FILE)
                          .read_text())["files"]
    for result in results:
        rank = result["rank"]
        own = {f"tensors/__{rank}_0.distcp"} | (
            {"tensors/.metadata", "trainer_state.pt"} if rank == 0 else set())
        assert set(result["at_save"]) == own, rank
        assert result["published_early"] != asynchronous
        assert_equal_snapshots(result["loaded"], result["saved"], f"rank {rank}")
    assert set().union(*(r["at_save"] for r in results)) == set(manifest)
    at_resume = [set(r["at_resume"]) for r in results]
    assert at_resume[0] and at_resume[1] and not at_resume[0] & at_resume[1]
    assert at_resume[0] | at_resume[1] == set(manifest)
