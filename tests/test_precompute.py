"""Cached latents end to end: ``trainer.precompute`` encodes real mp4 tar shards (in process,
and as a 2-rank torchrun job split over shards, restartable), and ``data=latents`` trains
with the same losses as the raw shards, resumes exactly and uses the cached null caption."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from itertools import islice

import pytest
import torch
from safetensors.torch import load

from data.latent_shards import MANIFEST, NULL_TEXT, LatentShards, load_null_text
from data.shards import ShardBatches, VideoShards, write_shard
from tests.conftest import ROOT, compose_train
from tests.test_shards import clip
from tests.test_train_e2e import train_losses
from trainer.build import single_process
from trainer.config import ConfigError
from trainer.draws import StepDraws
from trainer.objective import caption_keep_mask
from trainer.precompute import precompute
from trainer.t2v_task import TextToVideoTask
from trainer.train import train

pytestmark = pytest.mark.slow

GRID = ["data.sizes=[[32,32],[32,64]]", "data.durations=[4,8]", "data.batch_sizes=[2,2]",
        "data.image_batch_size=2", "data.fps=8", "data.num_workers=0", "model=dit_tiny"]
SMALL = ["model.depth=2", "model.width=64", "model.heads=4", "model.ffn_dim=128",
         "text.encoders.byte.dim=64", "text.encoders.byte.depth=1",
         "text.encoders.byte.ffn_dim=128", "trainer.progress=false"]
TRAIN = ["recipe.warmup_steps=2", "recipe.schedule=constant", "recipe.caption_dropout=0.5",
         "trainer.log_every=1", "trainer.ckpt_every=2", "trainer.val_every=4",
         "trainer.val_batches=2", "trainer.wandb.mode=disabled", "trainer.sample_prompts=[]"]
SHARDS = 4


def raw(pattern, *more):
    return ["data=webdataset", f"data.shards='{pattern}'", *GRID, *SMALL, *more]


def cached(pattern, *more):
    return ["data=latents", f"data.shards='{pattern}'", *GRID, *SMALL, *more]


def pattern_in(folder):
    return str(folder / f"{{000000..{SHARDS - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    """4 shards of 32x32 8-frame and 32x64 4-frame clips; shard 1 has a corrupt member."""
    tmp = tmp_path_factory.mktemp("raw")
    square, land = clip(tmp, "square", 8, 32, 32), clip(tmp, "land", 5, 32, 64)
    for s in range(SHARDS):
        samples = [{"__key__": f"s{s}_a", "mp4": square, "txt": f"a square clip {s}"},
                   {"__key__": f"s{s}_b", "mp4": land, "txt": f"a wide clip {s}",
                    "json": {"weight": 2 if s == 0 else 1}},
                   {"__key__": f"s{s}_c", "mp4": square, "json": {"caption": f"again {s}"}}]
        if s == 1:
            samples.insert(1, {"__key__": "s1_broken", "mp4": land[:300], "txt": "cut"})
        write_shard(tmp / f"{s:06d}.tar", samples)
    return tmp


@pytest.fixture(scope="module")
def cache(raw_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    counts = precompute(compose_train(raw(pattern_in(raw_shards))), str(out), batch=2)
    return out, counts


def members(path):
    """{key: (json, tensors)} of a cache shard, in order."""
    out = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            out.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else load(data)
    return out


def test_precompute_writes_one_cache_shard_per_raw_shard_split_over_ranks_and_restarts(
        raw_shards, cache, tmp_path):
    out, counts = cache
    assert counts == {"shards_written": 4, "samples_written": 12, "corrupt_video": 1}
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"{s:06d}.tar" for s in range(SHARDS)]
    assert (out / NULL_TEXT).is_file() and (out / MANIFEST).is_file()
    shard1 = members(out / "000001.tar")
    assert list(shard1) == ["s1_a", "s1_b", "s1_c"]  # raw order, the corrupt one skipped
    meta, tensors = shard1["s1_b"]["json"], shard1["s1_b"]["safetensors"]
    assert meta["caption"] == "a wide clip 1 FPS-8" and meta["bucket"] == [4, 32, 64]
    assert meta["latent_shape"] == [12, 4, 16, 32] and meta["weight"] == 1
    assert tensors["latent"].shape == (12, 4, 16, 32)
    assert tensors["text.byte.states"].shape == (48, 64)
    assert tensors["text.byte.mask"].dtype == torch.bool
    assert members(out / "000000.tar")["s0_b"]["json"]["weight"] == 2
    assert load_null_text(str(out))["byte"][1].sum() == 1  # "" is the eos token alone

    split = tmp_path / "split"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "-m", "trainer.precompute", f"output={split}", "batch=2",
         *raw(pattern_in(raw_shards))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"samples_written +12\n", result.stdout)
    assert re.search(r"skipped corrupt_video +1\n", result.stdout)
    for name in names:
        ours, theirs = members(out / name), members(split / name)
        assert list(ours) == list(theirs)
        for key in ours:
            assert ours[key]["json"] == theirs[key]["json"]
            for tensor, value in ours[key]["safetensors"].items():
                torch.testing.assert_close(theirs[key]["safetensors"][tensor], value)

    (split / "000002.tar").unlink()
    again = precompute(compose_train(raw(pattern_in(raw_shards))), str(split))
    assert again == {"shards_done_before": 3, "shards_written": 1, "samples_written": 3}
    assert list(members(split / "000002.tar")) == ["s2_a", "s2_b", "s2_c"]
    with pytest.raises(ConfigError, match="text.encoders=.*output=.*new output folder"):
        precompute(compose_train(raw(pattern_in(raw_shards), "text.encoders.byte.dim=32")),
                   str(split))


def test_a_trainable_text_encoder_cannot_be_cached(raw_shards, cache, tmp_path):
    trainable = "text.encoders.byte.trainable=true"
    with pytest.raises(ConfigError, match="text.encoders.byte.trainable=true: a trainable"):
        precompute(compose_train(raw(pattern_in(raw_shards), trainable)), str(tmp_path))
    with pytest.raises(ConfigError, match="text.encoders.byte.trainable=true"):
        TextToVideoTask(compose_train(cached(pattern_in(cache[0]), trainable)),
                        single_process(torch.device("cpu")))
    with pytest.raises(ConfigError, match=r"data.sizes=\[\[32, 32\]\] but the cache"):
        TextToVideoTask(compose_train(cached(pattern_in(cache[0]), "data.sizes=[[32,32]]")),
                        single_process(torch.device("cpu")))


def test_cache_batches_follow_the_raw_order_and_resume_exactly(raw_shards, cache):
    common = dict(seed=3, epochs=None)
    cfg = compose_train(cached(pattern_in(cache[0])))
    raw_keys = [k for b in islice(ShardBatches(VideoShards(
        pattern_in(raw_shards), cfg.data.grid(), 8, **common)), 9) for k in b["key"]]

    def latent_batches():
        return ShardBatches(LatentShards(pattern_in(cache[0]), cfg.data.grid(), 8, **common))

    reference = [b for b in islice(latent_batches(), 9)]
    assert [k for b in reference for k in b["key"]] == raw_keys
    first = reference[0]
    assert first["latent"].shape[0] == 2 and first["text"]["byte"][0].shape == (2, 48, 64)
    head = latent_batches()
    head_keys = [k for b in islice(head, 4) for k in b["key"]]
    resumed = latent_batches()
    resumed.load_state_dict(head.state_dict())
    assert head_keys + [k for b in islice(resumed, 5) for k in b["key"]] == raw_keys


def train_in(run_dir, overrides):
    """A training run in this process (Hydra's main would make the run directory)."""
    run_dir.mkdir(exist_ok=True)
    train(compose_train(overrides), run_dir, {})


def val_losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if r["kind"] == "val"]


def test_training_from_the_cache_matches_the_raw_shards_and_resumes_bitwise(
        raw_shards, cache, tmp_path):
    raw_pattern, cache_pattern = pattern_in(raw_shards), pattern_in(cache[0])
    runs = {"raw": raw(raw_pattern, f"data.val_shards='{raw_pattern}'", *TRAIN),
            "cache": cached(cache_pattern, f"data.val_shards='{cache_pattern}'", *TRAIN)}
    for name, overrides in runs.items():
        train_in(tmp_path / name, [*overrides, "trainer.max_steps=4"])
    from_raw, from_cache = train_losses(tmp_path / "raw"), train_losses(tmp_path / "cache")
    assert sorted(from_cache) == [1, 2, 3, 4]
    for step, loss in from_raw.items():
        assert abs(from_cache[step] - loss) <= 1e-5 * abs(loss), (step, from_raw, from_cache)
    for ours, theirs in zip(val_losses(tmp_path / "cache"), val_losses(tmp_path / "raw"),
                            strict=True):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    # caption dropout replaced some rows by the cached null caption (batches of 2 rows)
    assert not all(caption_keep_mask(StepDraws(0, s), slice(0, 2), 0.5).all()
                   for s in range(1, 5))

    resumed = tmp_path / "resumed"
    train_in(resumed, [*runs["cache"], "trainer.max_steps=2"])
    train_in(resumed, [*runs["cache"], "trainer.max_steps=4"])
    assert train_losses(resumed) == from_cache  # exact float equality, every step
