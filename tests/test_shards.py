import io
import logging
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from data.buckets import Bucket, BucketGrid
from data.shards import ShardBatches, VideoShards, WebDatasetConfig, write_shard
from data.video import write_video
from tests.media import audio_only

FPS = 8.0
# square, landscape and portrait buckets; 4- and 8-frame durations at 8 fps
GRID = dict(sizes=[[16, 16], [16, 32], [32, 16]], durations=[4, 8], batch_sizes=[2, 2],
            image_batch_size=2)


def grid(**overrides):
    return BucketGrid(**{**GRID, **overrides})


def clip(tmp_path, name, frames, height, width, fps=FPS, codec="libx264"):
    """mp4 bytes whose frame i is flat grey of level 10 * i (readable after lossy coding)."""
    levels = (np.arange(frames) * 10).astype(np.uint8)
    array = np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3))
    path = tmp_path / f"{name}.mp4"
    write_video(path, np.ascontiguousarray(array), fps, codec=codec)
    return path.read_bytes()


def png(height, width):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clips")
    return {"land": clip(tmp, "land", 8, 32, 64),        # 1 s landscape -> 8 frames
            "port": clip(tmp, "port", 5, 48, 24),        # 0.6 s portrait -> 4 frames
            "fast": clip(tmp, "fast", 16, 32, 32, fps=16)}  # 1 s square at 16 fps


def batches(shards, epochs=1, num_workers=0, **kwargs):
    dataset = VideoShards(shards, grid(), FPS, epochs=epochs, **kwargs)
    return ShardBatches(dataset, num_workers=num_workers)


def keys_of(loader, count=None):
    """Keys of the next `count` batches (all when None), in order."""
    return [key for batch in islice(loader, count) for key in batch["key"]]


def test_decoded_batches_have_their_bucket_shape_and_fps_tag(tmp_path, clips):
    write_shard(tmp_path / "a.tar", [
        {"__key__": "land", "mp4": clips["land"], "txt": "a field"},
        {"__key__": "port", "mp4": clips["port"], "json": {"caption": "a tower"}},
        {"__key__": "img", "png": png(20, 40), "txt": "a red card"},
        # 16 fps source sampled at 8 fps from 0.5 s: source frames 8, 10, 12, 14
        {"__key__": "cut", "mp4": clips["fast"], "json": {"caption": "c", "start": 0.5}},
    ])
    grid_one = grid(batch_sizes=[1, 1], image_batch_size=1)
    loader = ShardBatches(VideoShards(str(tmp_path / "a.tar"), grid_one, FPS, epochs=1))
    got = {b["key"][0]: b for b in loader}
    assert set(got) == {"land", "port", "img", "cut"}
    expected = {"land": (8, 16, 32), "port": (4, 32, 16), "img": (1, 16, 32), "cut": (4, 16, 16)}
    for key, batch in got.items():
        assert batch["bucket"] == list(expected[key])
        assert batch["video"].shape == (1, 3, *expected[key])
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert got["land"]["caption"] == ["a field FPS-8"]
    assert got["port"]["caption"] == ["a tower FPS-8"]
    assert got["img"]["caption"] == ["a red card"]  # an image has no frame rate
    levels = (got["cut"]["video"][0, :, :, 8, 8].mean(0) + 1) * 127.5
    assert np.allclose(levels.numpy(), [80, 100, 120, 140], atol=4)


def test_bucket_grid_picks_nearest_aspect_and_longest_fitting_duration():
    g = grid()
    assert g.assign(720, 1280, 100) == Bucket(8, 16, 32)
    assert g.assign(1280, 700, 7) == Bucket(4, 32, 16)
    assert g.assign(500, 520, None) == Bucket(1, 16, 16)
    assert g.assign(500, 520, 3) is None
    assert len(g.shapes()) == 9
    with pytest.raises(ValueError, match="batch_sizes"):
        grid(batch_sizes=[2])


def make_shards(tmp_path, clips, count=4, per_shard=3):
    kinds = ["land", "port", "fast"]
    for s in range(count):
        write_shard(tmp_path / f"{s:06d}.tar", [
            {"__key__": f"s{s}_{i}", "mp4": clips[kinds[(s + i) % 3]], "txt": f"clip {s} {i}"}
            for i in range(per_shard)])
    return str(tmp_path / f"{{000000..{count - 1:06d}}}.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_parallel_ranks_are_disjoint_and_complete(tmp_path, clips, num_workers):
    pattern = make_shards(tmp_path, clips)
    ranks = [keys_of(batches(pattern, dp_rank=r, dp_size=2, num_workers=num_workers))
             for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(f"s{s}_{i}" for s in range(4) for i in range(3))
    assert all(len(keys) == len(set(keys)) == 6 for keys in ranks)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_repeats_and_skips_nothing(tmp_path, clips, num_workers):
    pattern = make_shards(tmp_path, clips)
    reference = keys_of(batches(pattern, num_workers=num_workers, seed=5))
    first = batches(pattern, num_workers=num_workers, seed=5)
    head = keys_of(first, 2)
    resumed = batches(pattern, num_workers=num_workers, seed=5)
    resumed.load_state_dict(first.state_dict())
    tail = keys_of(resumed)
    assert len(head + tail) == len(set(head + tail)) == 12
    assert sorted(head + tail) == sorted(reference)
    if num_workers == 0:  # one worker: even the order is the same
        assert head + tail == reference


def test_resume_with_another_dp_size_is_refused(tmp_path, clips):
    pattern = make_shards(tmp_path, clips)
    first = batches(pattern, dp_rank=0, dp_size=2)
    keys_of(first, 1)
    other = batches(pattern)
    with pytest.raises(ValueError, match="dp_size=2, this run has dp_size=1"):
        other.load_state_dict(first.state_dict())
    # a list of every rank's state: each rank picks its own
    again = batches(pattern, dp_rank=0, dp_size=2)
    again.load_state_dict([batches(pattern, dp_rank=1, dp_size=2).state_dict(),
                           first.state_dict()])
    assert again.state_dict() == first.state_dict()


def test_every_kind_of_bad_input_is_skipped_counted_and_logged(tmp_path, clips, caplog):
    good = clips["land"]
    write_shard(tmp_path / "000000.tar", [
        {"__key__": "ok1", "mp4": good, "txt": "fine"},
        {"__key__": "truncated", "mp4": good[: len(good) // 2], "txt": "t"},
        {"__key__": "garbage", "mp4": b"\x00not a video" * 50, "txt": "g"},
        {"__key__": "empty", "mp4": b"", "txt": "e"},
        {"__key__": "nocaption", "mp4": good},
        {"__key__": "badjson", "mp4": good, "json": "{caption: oops"},
        {"__key__": "badstart", "mp4": good, "json": {"caption": "s", "start": "soon"}},
        {"__key__": "textonly", "txt": "no media"},
        {"__key__": "audio", "mkv": audio_only(), "txt": "no video stream"},
        {"__key__": "codec", "mp4": good.replace(b"avc1", b"zzzz"), "txt": "unknown codec"},
        {"__key__": "short", "mp4": clip(tmp_path, "short", 2, 16, 16), "txt": "2 frames"},
        {"__key__": "ok2", "png": png(16, 16), "txt": "fine"},
    ])
    write_shard(tmp_path / "000001.tar", [
        {"__key__": f"tail{i}", "mp4": good, "txt": "t"} for i in range(3)])
    with tarfile.open(tmp_path / "000001.tar") as tar:
        last = tar.getmember("tail2.mp4")
    data = (tmp_path / "000001.tar").read_bytes()
    (tmp_path / "000001.tar").write_bytes(data[: last.offset_data + last.size // 2])
    loader = batches(str(tmp_path / "{000000..000001}.tar"))
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        keys = keys_of(loader)
    assert set(keys) >= {"ok1", "ok2"} and "tail2" not in keys
    assert set(keys) <= {"ok1", "ok2", "tail0", "tail1"}
    assert loader.skipped == {"corrupt_video": 2, "empty_member": 1, "missing_caption": 1,
                              "bad_json": 2, "unsupported_codec": 1, "too_short": 1,
                              "no_media": 1, "no_video_stream": 1, "bad_shard": 1}
    assert "skipping sample badjson of shard" in caplog.text and "000000.tar" in caplog.text
    assert "skipping the rest of shard" in caplog.text and "000001.tar" in caplog.text


def test_shards_without_a_usable_sample_end_with_an_error_not_a_hang(tmp_path):
    write_shard(tmp_path / "bad.tar", [{"__key__": "a", "txt": "no media"}])
    with pytest.raises(RuntimeError, match=r"no usable sample .*'no_media': 1"):
        next(iter(batches(str(tmp_path / "bad.tar"), epochs=None, num_workers=2)))


def test_a_pattern_that_matches_nothing_is_an_error(tmp_path):
    pattern = str(tmp_path / "{000000..000003}.tar")
    with pytest.raises(ValueError, match="matches no shard"):
        VideoShards(pattern, grid(), FPS)
    with pytest.raises(ValueError, match="fewer than the 3 data-parallel ranks"):
        write_shard(tmp_path / "x.tar", [{"__key__": "a", "txt": "a"}])
        VideoShards(str(tmp_path / "x.tar"), grid(), FPS, dp_rank=0, dp_size=3)


def test_write_shard_is_a_plain_tar_and_the_yaml_fits_the_schema(tmp_path):
    write_shard(tmp_path / "s.tar", [{"__key__": "k", "txt": "hi", "json": {"fps": 8}}])
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert tar.getnames() == ["k.txt", "k.json"]
    assert not list(tmp_path.glob("*.tmp"))
    yaml = OmegaConf.load(Path(__file__).parents[1] / "conf/data/webdataset.yaml")
    del yaml["defaults"]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WebDatasetConfig), yaml))
    assert len(cfg.grid().shapes()) == 30  # 5 aspects × (5 durations + images)
    with pytest.raises(ValueError, match="data.fps"):
        WebDatasetConfig(fps=0)
    with pytest.raises(ValueError, match=r"data.batch_sizes=\[1\] must give one"):
        WebDatasetConfig(batch_sizes=[1])


def test_resume_at_any_batch_across_epochs_continues_exactly(tmp_path, clips):
    pattern = make_shards(tmp_path, clips, count=3)  # 9 samples: 3 epochs in 14 batches
    reference = keys_of(batches(pattern, epochs=None, seed=1), 14)
    assert sorted(reference[:9]) != sorted(reference[9:18])  # part-filled buckets carry over
    for cut in (1, 5, 9):
        first = batches(pattern, epochs=None, seed=1)
        head = keys_of(first, cut)
        resumed = batches(pattern, epochs=None, seed=1)
        resumed.load_state_dict(first.state_dict())
        assert head + keys_of(resumed, 14 - cut) == reference


def test_sampling_weights_repeat_and_drop_deterministically(tmp_path, clips):
    weights = {"never": 0, "once": 1, "twice": 2, "half": 0.5}
    write_shard(tmp_path / "w.tar", [
        {"__key__": key, "mp4": clips["land"], "json": {"caption": key, "weight": w}}
        for key, w in weights.items()] + [
        {"__key__": "negative", "mp4": clips["land"], "json": {"caption": "n", "weight": -1}}])
    grid_one = grid(batch_sizes=[1, 1])
    runs = [[k for b in ShardBatches(VideoShards(str(tmp_path / "w.tar"), grid_one, FPS, seed=1,
                                                 epochs=8)) for k in b["key"]]
            for _ in range(2)]
    assert runs[0] == runs[1]
    counts = {key: runs[0].count(key) for key in weights}
    assert counts["never"] == 0 and counts["once"] == 8 and counts["twice"] == 16
    assert 1 <= counts["half"] <= 7
    assert "negative" not in runs[0]
