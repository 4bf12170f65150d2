"""A caption that no text encoder can encode (a lone UTF-16 surrogate, valid JSON) is
skipped and counted as ``bad_caption`` where it enters: the shard loader and
``trainer.precompute``; it never reaches the training step."""

from __future__ import annotations

import json

from data.shards import ShardBatches, VideoShards, write_shard
from tests.conftest import compose_train
from tests.test_shards import clip, grid
from trainer.precompute import precompute

LONE_SURROGATE = "a red square \ud800 moving left"


def surrogate_shard(tmp_path):
    """One good clip and one whose json caption holds a lone surrogate. The json member is
    written by hand: ``json.dumps`` escapes the surrogate as the text ``\\ud800``, which is
    valid JSON that decodes back to the lone surrogate."""
    good = clip(tmp_path, "square", 8, 32, 32)
    bad_json = json.dumps({"caption": LONE_SURROGATE})
    assert "\\ud800" in bad_json
    path = tmp_path / "raw" / "000000.tar"
    # bad first: the loader's counts are those of the batches handed out so far
    write_shard(path, [{"__key__": "bad", "mp4": good, "json": bad_json},
                       {"__key__": "good", "mp4": good, "txt": "a blue circle"}])
    return path


def test_the_shard_loader_skips_and_counts_a_lone_surrogate(tmp_path):
    path = surrogate_shard(tmp_path)
    loader = ShardBatches(VideoShards(str(path), grid(batch_sizes=[1, 1]), 8.0, epochs=1))
    batches = list(loader)
    assert [key for batch in batches for key in batch["key"]] == ["good"]
    for batch in batches:
        for caption in batch["caption"]:
            caption.encode("utf-8")  # what every text encoder does first
    assert loader.skipped == {"bad_caption": 1}


def test_precompute_skips_and_counts_a_lone_surrogate(tmp_path):
    path = surrogate_shard(tmp_path)
    cfg = compose_train(["data=webdataset", f"data.shards={path}", "data.sizes=[[32,32]]",
                         "data.durations=[4,8]", "model=dit_tiny", "data.batch_sizes=[2,2]",
                         "data.image_batch_size=2", "data.fps=8", "data.num_workers=0",
                         "trainer.progress=false"])
    counts = precompute(cfg, str(tmp_path / "cache"), batch=2)
    assert counts == {"shards_written": 1, "samples_written": 1, "bad_caption": 1}
