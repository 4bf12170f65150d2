"""Resuming a shard reader from the state after any batch of a run continues that run."""

from __future__ import annotations

import tarfile
from itertools import islice

from data.buckets import BucketGrid
from data.shards import ShardBatches, VideoShards, write_shard
from tests.test_shards import FPS, GRID, clip, png


def write_shards(folder) -> str:
    """Three shards of images in three buckets, one video, weights that repeat or drop a
    sample, two bad samples and a shard cut off inside its last sample."""
    video = clip(folder, "land", 8, 32, 64)
    write_shard(folder / "000000.tar", [
        {"__key__": "a", "png": png(16, 16), "json": {"caption": "a", "weight": 3}},
        {"__key__": "b", "png": png(16, 32), "txt": "b"},
        {"__key__": "nomedia", "txt": "no media"},
        {"__key__": "c", "png": png(32, 16), "json": {"caption": "c", "weight": 0.5}},
        {"__key__": "v", "mp4": video, "txt": "v"},
    ])
    write_shard(folder / "000001.tar", [
        {"__key__": "d", "png": png(16, 16), "txt": "d"},
        {"__key__": "badjson", "png": png(16, 16), "json": "{caption: oops"},
        {"__key__": "e", "png": png(16, 32), "json": {"caption": "e", "weight": 2}},
        {"__key__": "cut", "png": png(16, 16), "txt": "cut"},
    ])
    with tarfile.open(folder / "000001.tar") as tar:
        last = tar.getmember("cut.png")
    data = (folder / "000001.tar").read_bytes()
    (folder / "000001.tar").write_bytes(data[: last.offset_data + last.size // 2])
    write_shard(folder / "000002.tar", [
        {"__key__": "f", "png": png(32, 16), "txt": "f"},
        {"__key__": "never", "png": png(16, 16), "json": {"caption": "g", "weight": 0}},
        {"__key__": "h", "png": png(16, 32), "txt": "h"},
    ])
    return str(folder / "{000000..000002}.tar")


def test_resume_after_every_batch_gives_the_remaining_batches_and_skip_counts(tmp_path):
    pattern = write_shards(tmp_path)
    grid = BucketGrid(**{**GRID, "image_batch_size": 3})

    def loader() -> ShardBatches:
        return ShardBatches(VideoShards(pattern, grid, FPS, seed=3, epochs=2))

    def contents(batches) -> list[tuple[list[str], list[int]]]:
        return [(batch["key"], batch["bucket"]) for batch in batches]

    whole = loader()
    reference = contents(whole)
    keys = [key for batch_keys, _ in reference for key in batch_keys]
    assert keys.count("a") == 6 and "never" not in keys and "cut" not in keys
    assert any(len(batch_keys) == 1 for batch_keys, _ in reference)  # part-filled at the end
    assert whole.skipped == {"no_media": 2, "bad_json": 2, "bad_shard": 2,
                             "dropped_by_weight": 2 + 2 - keys.count("c")}
    for cut in range(len(reference) + 1):
        first = loader()
        head = contents(islice(first, cut))
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        assert head + contents(resumed) == reference, f"resumed after batch {cut}"
        assert resumed.skipped == whole.skipped, f"resumed after batch {cut}"
        assert resumed.state_dict() == whole.state_dict()
