"""Batches to the device: synthetic clips built in loader workers, the same batches in the
same order with or without them, and the look-ahead's resume state is the consumed one."""

from __future__ import annotations

import os
from itertools import islice

import torch
from torch.utils.data import Dataset

from data.loader import ShuffledBatches
from data.synthetic import SyntheticVideos
from tests.conftest import compose_train
from trainer.build import single_process
from trainer.data import build_datasets, build_train_batches
from trainer.device_batches import DeviceBatches, map_tensors, one_ahead


class Pids(Dataset):
    """Each sample's video holds the id of the process that built it."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"video": torch.tensor([os.getpid()]), "caption": "", "fps": 8.0,
                "key": f"k{i:02d}"}


def clips(workers: int) -> ShuffledBatches:
    data = SyntheticVideos(20, frames=2, height=8, width=8, fps=8.0, seed=1)
    return ShuffledBatches(data, batch_size=3, seed=5, num_workers=workers)


def same(a: dict, b: dict) -> bool:
    return (a["key"] == b["key"] and a["caption"] == b["caption"]
            and torch.equal(a["video"], b["video"]) and torch.equal(a["fps"], b["fps"]))


def test_workers_build_the_samples_in_other_processes():
    pids = {int(p) for batch in islice(ShuffledBatches(Pids(), 4, seed=0, num_workers=2), 6)
            for p in batch["video"]}
    assert os.getpid() not in pids and len(pids) == 2  # both workers, never this process
    inline = next(iter(ShuffledBatches(Pids(), 4, seed=0)))["video"]
    assert set(inline.flatten().tolist()) == {os.getpid()}


def test_workers_give_the_same_batches_order_and_resume_state():
    # 6 batches per epoch: 14 batches cross two epoch boundaries
    plain, pooled = clips(0), clips(2)
    plain_iter, pooled_iter = iter(plain), iter(pooled)
    for index in range(14):
        assert same(next(plain_iter), next(pooled_iter)), index
        assert plain.state_dict() == pooled.state_dict(), index
    for cut in (0, 5, 6, 11):  # resume with workers from states of a run without
        head = clips(0)
        list(islice(head, cut))
        resumed = clips(2)
        resumed.load_state_dict(head.state_dict())
        expected = list(islice(clips(0), cut, cut + 4))
        assert all(map(same, islice(resumed, 4), expected)), cut


def test_one_ahead_pairs_each_batch_with_the_state_after_it():
    reference = clips(0)
    keys, states = [], []
    for batch in islice(reference, 9):  # across the epoch boundary after batch 6
        keys.append(batch["key"])
        states.append(reference.state_dict())
    source = clips(0)
    ahead = list(islice(one_ahead(iter(source), source.state_dict), 8))
    assert source.state_dict() == states[8]  # read one batch past the last handed out
    for index, (batch, state) in enumerate(ahead):
        assert batch["key"] == keys[index] and state == states[index], index
        resumed = clips(0)
        resumed.load_state_dict(state)
        assert next(iter(resumed))["key"] == keys[index + 1], index
    assert list(one_ahead(iter([]), dict)) == []


def test_cpu_batches_pass_through_unpinned_and_keep_the_loader_state():
    loader = clips(0)
    device_batches = DeviceBatches(loader, torch.device("cpu"))
    assert not device_batches.ahead
    batch = next(iter(device_batches))
    assert batch["video"].device.type == "cpu" and not batch["video"].is_pinned()
    assert device_batches.state_dict() == loader.state_dict() == {
        "epoch": 0, "position": 1, "global_batch_size": 3, "seed": 5}
    source = [{"video": torch.zeros(1)}]
    assert next(iter(DeviceBatches(_Listed(source), "cpu"))) is source[0]


class _Listed(list):
    def state_dict(self):
        return {}


def test_map_tensors_reaches_nested_tensors_only():
    batch = {"latent": torch.ones(2), "text": {"byte": (torch.ones(1), torch.zeros(1))},
             "caption": ["a", "b"], "bucket": [1, 2, 3]}
    doubled = map_tensors(batch, lambda t: t * 2)
    assert torch.equal(doubled["latent"], torch.full((2,), 2.0))
    assert isinstance(doubled["text"]["byte"], tuple)
    assert torch.equal(doubled["text"]["byte"][0], torch.full((1,), 2.0))
    assert doubled["caption"] == ["a", "b"] and doubled["bucket"] == [1, 2, 3]


def test_training_batches_use_the_configured_workers_and_resume_exactly():
    overrides = ["experiment=t2v_tiny", "data.num_samples=40", "model=dit_tiny", "data.frames=2",
                 "data.height=8", "data.width=8", "recipe.batch_size=4"]
    cfg = compose_train([*overrides, "data.num_workers=2"])
    ctx = single_process(torch.device("cpu"))
    batches = build_train_batches(cfg, build_datasets(cfg.data)[0], ctx)
    assert batches.batches.num_workers == 2
    keys = [batch["key"] for batch in islice(batches, 12)]  # into the second epoch
    state = batches.state_dict()
    resumed = build_train_batches(cfg, build_datasets(cfg.data)[0], ctx)
    resumed.load_state_dict(state)
    inline_cfg = compose_train([*overrides, "data.num_workers=0"])
    inline = build_train_batches(inline_cfg, build_datasets(inline_cfg.data)[0], ctx)
    expected = [batch["key"] for batch in islice(inline, 15)]
    assert keys + [batch["key"] for batch in islice(resumed, 3)] == expected
