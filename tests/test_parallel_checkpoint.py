"""DCP checkpoints reshard: what one mesh saves, another loads bit for bit (model,
optimizer moments, EMA), and a model trained on a mesh exports to one safetensors file;
checkpoints of any mesh average (``trainer.average``) like one process's."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

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
