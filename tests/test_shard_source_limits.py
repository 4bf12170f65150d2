"""Limits on what a shard source and a sample's json can do to the loader: a ``pipe:``
that stops sending is abandoned after ``data.pipe_stall_s``, an http(s) URL never reaches
a shell, and a sampling ``weight`` is bounded."""

from __future__ import annotations

import logging
import math
import tarfile
import time

import pytest

from data.shards import MAX_SAMPLE_WEIGHT, ShardBatches, VideoShards, WebDatasetConfig, write_shard
from tests.distributed import free_port
from tests.test_shards import FPS, clip, grid, keys_of


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return clip(tmp_path_factory.mktemp("clip"), "v", 8, 16, 32)


def shard_of(path, video, keys):
    write_shard(path, [{"__key__": key, "mp4": video, "txt": f"clip {key}"} for key in keys])
    return str(path)


def loader(urls, **options):
    return ShardBatches(VideoShards(urls, grid(batch_sizes=[1, 1]), FPS, epochs=1, **options))


def test_a_pipe_that_stops_sending_is_abandoned_and_the_loader_goes_on(tmp_path, video, caplog):
    good = shard_of(tmp_path / "good.tar", video, ["g0", "g1"])
    head = shard_of(tmp_path / "head.tar", video, ["h0", "h1"])
    first_sample = 3 * 512 + len(video)  # headers and data of h0.mp4 and h0.txt, padded
    marker = tmp_path / "the command outlived its shard"
    silent = f"pipe:sleep 1.5; touch '{marker}'"
    stalls = f"pipe:head -c {first_sample + 1024} {head}; sleep 30"  # sends h0, then stops
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        keys = keys_of(loader([silent, stalls, f"pipe:cat {good}"], stall_s=0.3))
    assert sorted(keys) == ["g0", "g1", "h0"]  # what the stalled shard sent is kept
    assert "produced no byte for 0.3 s (data.pipe_stall_s=0.3)" in caplog.text
    assert f"skipping the rest of shard {silent}" in caplog.text
    assert f"skipping the rest of shard {stalls} after sample h0" in caplog.text
    time.sleep(2)
    assert not marker.exists()  # the stalled command was killed with its shell


def test_pipe_stall_counts_as_a_bad_shard_and_is_configured(tmp_path, video):
    batches = loader(["pipe:sleep 30", shard_of(tmp_path / "a.tar", video, ["a"])],
                     stall_s=0.2)
    assert keys_of(batches) == ["a"] and batches.skipped == {"bad_shard": 1}
    assert WebDatasetConfig().pipe_stall_s == 300
    for bad in (0, -1, math.inf):
        with pytest.raises(ValueError, match=rf"data.pipe_stall_s={bad} must be a finite"):
            WebDatasetConfig(pipe_stall_s=bad)
    with pytest.raises(ValueError, match=r"data.max_member_bytes=0 must be >= 1"):
        WebDatasetConfig(max_member_bytes=0)


@pytest.mark.parametrize("payload", ["/a.tar;touch {marker}", "/$(touch {marker}).tar",
                                     "/`touch {marker}`.tar", "/a'$(touch {marker})'.tar",
                                     "/a.tar|touch {marker}", "/a.tar\ntouch {marker}"])
def test_an_http_url_never_reaches_a_shell(tmp_path, payload):
    marker = tmp_path / "ran"
    url = f"http://127.0.0.1:{free_port()}" + payload.format(marker=marker)
    batches = loader([url])
    assert keys_of(batches) == [] and batches.skipped == {"bad_shard": 1}
    assert not marker.exists()


def test_sampling_weights_are_bounded(tmp_path, video, caplog):
    weights = {"nan": math.nan, "inf": math.inf, "negative": -1, "text": "2", "bool": True,
               "huge": 1e9, "three": 3}
    write_shard(tmp_path / "w.tar", [
        {"__key__": key, "mp4": video, "json": {"caption": key, "weight": weight}}
        for key, weight in weights.items()])
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        batches = loader(str(tmp_path / "w.tar"))
        keys = keys_of(batches)
    assert batches.skipped == {"bad_weight": 5}
    assert keys.count("huge") == MAX_SAMPLE_WEIGHT == 100 and keys.count("three") == 3
    assert "sample huge: weight 1000000000.0 is above 100, used as 100" in caplog.text
    assert "skipping sample nan of shard" in caplog.text and "bad_weight: weight=nan" in caplog.text
    # unweighted readers (validation, precompute) use a sample once, but still skip bad ones
    once = loader(str(tmp_path / "w.tar"), weighted=False)
    assert sorted(keys_of(once)) == ["huge", "three"] and once.skipped == {"bad_weight": 5}


def test_a_shard_cut_between_two_samples_is_a_bad_shard_not_a_shorter_one(tmp_path, video,
                                                                          caplog):
    """Python's tarfile ends a stream quietly where a header is missing: a shard whose copy
    stopped exactly at a sample boundary would read as complete, its later samples lost
    uncounted. The end-of-archive block decides; gzip streams are checked by gzip."""
    head = shard_of(tmp_path / "head.tar", video, ["h0", "h1", "h2"])
    with tarfile.open(head) as tar:
        boundary = next(info.offset for info in tar if info.name.startswith("h2."))
    cut = f"pipe:head -c {boundary} {head}"
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        batches = loader([cut])
        # h1 is withheld too: the cut may have taken more of its members
        assert keys_of(batches) == ["h0"] and batches.skipped == {"bad_shard": 1}
    assert "without the end-of-archive block (cut short)" in caplog.text
    whole = loader([f"pipe:cat {head}", f"pipe:gzip -c {head}"])
    assert sorted(keys_of(whole)) == ["h0", "h0", "h1", "h1", "h2", "h2"] and not whole.skipped
