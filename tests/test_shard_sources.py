"""Where shard batches come from besides one local video set: image shards mixed in at a
ratio, held-out val shards, ``pipe:`` and http:// shard URLs; and the decoder's resize."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from data.buckets import BucketGrid
from data.decode import cover_crop, decode_video
from data.shards import (
    ShardBatches,
    VideoShards,
    WebDatasetConfig,
    build_shard_batches,
    expand_shards,
    write_shard,
)
from data.video import write_video
from tests.conftest import compose_train
from tests.test_shards import FPS, GRID, clip, keys_of, make_shards, png
from trainer.data import build_val_batches

SHAPES = dict(sizes=GRID["sizes"], durations=GRID["durations"], batch_sizes=GRID["batch_sizes"],
              image_batch_size=GRID["image_batch_size"], fps=FPS, num_workers=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clips")
    return {"land": clip(tmp, "land", 8, 32, 64), "port": clip(tmp, "port", 5, 48, 24),
            "fast": clip(tmp, "fast", 16, 32, 32, fps=16)}


def make_image_shards(folder, count=4, per_shard=5):
    sizes = [(16, 16), (16, 32), (32, 16)]
    for s in range(count):
        write_shard(folder / f"img{s:06d}.tar", [
            {"__key__": f"i{s}_{i}", "png": png(*sizes[(s + i) % 3]), "txt": f"image {s} {i}"}
            for i in range(per_shard)])
    return str(folder / f"img{{000000..{count - 1:06d}}}.tar")


def mixed(tmp_path, clips, epochs=None, **overrides):
    cfg = WebDatasetConfig(shards=make_shards(tmp_path, clips),
                           image_shards=make_image_shards(tmp_path), seed=3,
                           **{**SHAPES, "image_ratio": 0.5, **overrides})
    return build_shard_batches(cfg, dp_rank=0, dp_size=1, epochs=epochs)


def is_image(key: str) -> bool:
    return key.startswith("i")


def test_images_are_mixed_in_at_the_configured_ratio(tmp_path, clips):
    loader = mixed(tmp_path, clips)
    videos = images = 0
    for batch in islice(loader, 40):
        kinds = {is_image(k) for k in batch["key"]}
        assert len(kinds) == 1 and (batch["bucket"][0] == 1) == kinds.pop()
        images += len(batch["key"]) if is_image(batch["key"][0]) else 0
        videos += 0 if is_image(batch["key"][0]) else len(batch["key"])
        # the next batch comes from whichever stream is behind: off by under one batch
        assert -2 <= images - 0.5 * videos <= 2, (images, videos)
    assert videos > 12 and images > 20  # both streams went past their first epoch


def test_mixed_batches_resume_exactly_in_both_streams(tmp_path, clips):
    reference = keys_of(mixed(tmp_path, clips), 30)
    for cut in (1, 8, 17):
        first = mixed(tmp_path, clips)
        head = keys_of(first, cut)
        resumed = mixed(tmp_path, clips)
        resumed.load_state_dict(first.state_dict())
        assert head + keys_of(resumed, 30 - cut) == reference


def test_mixed_batches_resume_with_two_workers(tmp_path, clips):
    reference = keys_of(mixed(tmp_path, clips, epochs=2, num_workers=2))
    first = mixed(tmp_path, clips, epochs=2, num_workers=2)
    head = keys_of(first, 7)
    resumed = mixed(tmp_path, clips, epochs=2, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert Counter(head + keys_of(resumed)) == Counter(reference)
    assert Counter(reference) == Counter({k: 2 for k in set(reference)})  # 2 epochs, each once
    assert len([k for k in reference if is_image(k)]) == 2 * 20


def test_mixing_misconfigurations_name_the_key_and_the_fix(tmp_path, clips):
    with pytest.raises(ValueError, match=r"data.image_ratio=0 .*data.image_shards=null"):
        WebDatasetConfig(image_shards="x.tar", image_ratio=0)
    with pytest.raises(ValueError, match="data.val_shards='' names no shard"):
        WebDatasetConfig(val_shards="")
    with pytest.raises(ValueError, match=r"data.image_shards=.* 4 shards, fewer than the 5 "
                                         r"readers .*lower data.num_workers"):
        mixed(tmp_path, clips, num_workers=5)
    with pytest.raises(ValueError, match=r"data.image_shards='.*nope.tar' matches no shard"):
        build_shard_batches(WebDatasetConfig(shards=make_shards(tmp_path, clips),
                                             image_shards=str(tmp_path / "nope.tar")), 0, 1)


def test_val_batches_read_every_val_shard_in_a_fixed_order(tmp_path, clips):
    train = make_shards(tmp_path / "train", clips)
    write_shard(tmp_path / "val" / "000000.tar", [
        {"__key__": "v_land", "mp4": clips["land"], "json": {"caption": "l", "weight": 0}},
        {"__key__": "v_port", "mp4": clips["port"], "json": {"caption": "p", "weight": 3}},
        {"__key__": "v_img", "png": png(16, 32), "txt": "an image"}])
    write_shard(tmp_path / "val" / "000001.tar", [
        {"__key__": "v_land2", "mp4": clips["land"], "txt": "l2"},
        {"__key__": "v_fast", "mp4": clips["fast"], "txt": "f"}])
    cfg = compose_train(["data=webdataset", f"data.shards='{train}'",
                         f"data.val_shards='{tmp_path}/val/{{000000..000001}}.tar'",
                         "data.sizes=[[16,16],[16,32],[32,16]]", "data.durations=[4,8]",
                         "data.batch_sizes=[2,2]", "data.image_batch_size=2", "data.fps=8",
                         "model=dit_tiny"])
    val_batches = build_val_batches(cfg)
    runs = [list(val_batches()) for _ in range(2)]
    keys = [[k for b in run for k in b["key"]] for run in runs]
    assert keys[0] == keys[1]  # every call starts over, in the same order
    # every sample once, curation weights ignored; none of the training keys
    assert sorted(keys[0]) == ["v_fast", "v_img", "v_land", "v_land2", "v_port"]
    for batch in runs[0]:
        assert batch["video"].shape[0] == len(batch["key"]) <= 2
        assert tuple(batch["video"].shape[2:]) == tuple(batch["bucket"])
    assert {tuple(b["bucket"]) for b in runs[0]} == {(8, 16, 32), (4, 32, 16), (1, 16, 32),
                                                     (8, 16, 16)}
    partial = islice(val_batches(), 1)  # a call stopped early does not shift the next one
    assert [b["key"] for b in partial] == [runs[0][0]["key"]]
    assert [b["key"] for b in val_batches()] == [b["key"] for b in runs[0]]

    assert build_val_batches(compose_train(["data=webdataset", f"data.shards='{train}'"])) is None


def test_synthetic_val_batches_are_the_val_split_in_index_order():
    cfg = compose_train(["data.val_samples=8", "recipe.batch_size=4"])
    val_batches = build_val_batches(cfg)
    first, again = list(val_batches()), list(val_batches())
    assert len(first) == 2 and [b["key"] for b in first] == [b["key"] for b in again]
    assert all(b["video"].shape[0] == 4 for b in first)
    assert build_val_batches(compose_train(["data.val_samples=0"])) is None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL) of a local HTTP server on 127.0.0.1 serving `folder`."""
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pipe_and_http_shards_load_and_missing_local_paths_fail(http_root, clips):
    folder, url = http_root
    make_shards(folder, clips, count=2)
    pipe = f"pipe:cat {folder}/{{000000..000001}}.tar"
    http = f"{url}/{{000000..000001}}.tar"
    assert expand_shards(pipe) == [f"pipe:cat {folder}/00000{i}.tar" for i in range(2)]
    assert expand_shards(http) == [f"{url}/00000{i}.tar" for i in range(2)]
    expected = sorted(f"s{s}_{i}" for s in range(2) for i in range(3))
    for pattern in (pipe, http):
        loader = ShardBatches(VideoShards(pattern, BucketGrid(**GRID), FPS, epochs=1))
        assert sorted(keys_of(loader)) == expected
        assert not loader.skipped
    # a URL that is not there is a bad shard, counted, not a crash
    loader = ShardBatches(VideoShards([f"{url}/000000.tar", f"{url}/gone.tar"],
                                      BucketGrid(**GRID), FPS, epochs=1))
    assert sorted(keys_of(loader)) == expected[:3] and loader.skipped == {"bad_shard": 1}
    with pytest.raises(ValueError, match=r"names missing shards: 1 of 4 are local files "
                                         r"that do not exist, e\.g\. '.*gone\.tar'"):
        expand_shards([http, str(folder / "000000.tar"), str(folder / "gone.tar")])


def test_weighted_copies_survive_a_checkpoint_between_them(tmp_path, clips):
    write_shard(tmp_path / "w.tar", [
        {"__key__": key, "mp4": clips["land"], "json": {"caption": key, "weight": w}}
        for key, w in (("a", 3), ("b", 1), ("c", 2))])
    one = BucketGrid(**{**GRID, "batch_sizes": [1, 1]})

    def loader():
        return ShardBatches(VideoShards(str(tmp_path / "w.tar"), one, FPS, epochs=1))

    reference = keys_of(loader())
    assert reference == ["a", "a", "a", "b", "c", "c"]
    for cut in range(1, 6):
        first = loader()
        head = keys_of(first, cut)
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        assert head + keys_of(resumed) == reference


def _reference_cover_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cover-resize the whole image with PIL's antialiased bicubic, then centre-crop."""
    scale = max(height / image.shape[0], width / image.shape[1])
    w = max(width, round(image.shape[1] * scale))
    h = max(height, round(image.shape[0] * scale))
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
    top, left = (h - height) // 2, (w - width) // 2
    return resized[top: top + height, left: left + width]


def _smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = [128 + 100 * np.sin(6 * x + 3 * y), 128 + 100 * np.cos(5 * y - 2 * x),
           128 + 80 * np.sin(4 * (x + y))]
    return np.stack(rgb, -1).astype(np.uint8)


@pytest.mark.parametrize("source,target", [((720, 1280), (256, 256)), ((720, 1280), (768, 768)),
                                           ((720, 1280), (192, 336)), ((1280, 720), (336, 192)),
                                           ((100, 60), (336, 192)), ((64, 64), (64, 64))])
def test_cover_crop_matches_a_reference_resize(source, target):
    image = _smooth(*source)
    ours = cover_crop(image, *target)
    assert ours.shape == (*target, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - _reference_cover_crop(image, *target).astype(int))
    # smooth content: differences come only from the filters and sub-pixel crop rounding
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 6, (diff.mean(), diff.max())


def test_decoded_frames_keep_their_place_in_the_cover_crop(tmp_path):
    """A 1280x720 frame with a bright box at a known place lands where the cover-crop maps it."""
    frame = np.full((720, 1280, 3), 30, np.uint8)
    frame[300:420, 600:720] = 220  # a 120 px box around the centre, slightly left
    path = tmp_path / "box.mp4"
    write_video(path, np.repeat(frame[None], 8, 0), FPS)
    grid = BucketGrid([[256, 256]], [4], [1], 1)
    frames, bucket = decode_video(path.read_bytes(), {}, FPS, grid)
    assert frames.shape == (4, 256, 256, 3)
    scale = 256 / 720  # the crop keeps source columns 280..1000
    bright = np.argwhere(frames[0, :, :, 0] > 125)
    top, left = bright.min(0)
    bottom, right = bright.max(0)
    assert abs(top - 300 * scale) <= 1.5 and abs(bottom - 420 * scale) <= 1.5
    assert abs(left - (600 - 280) * scale) <= 1.5 and abs(right - (720 - 280) * scale) <= 1.5
