"""Training batches from webdataset tar shards of videos and images.

Shard format: a sample is the tar members sharing a key (the name up to its first dot):
``KEY.mp4|webm|mkv|mov`` or ``KEY.jpg|jpeg|png|webp`` (an image is a one-frame video),
``KEY.txt`` caption and/or ``KEY.json`` metadata (caption, duration, fps, width, height,
clip ``start``/``end`` in seconds, sampling ``weight``: a sample is used floor(weight)
times per epoch, plus once more with probability equal to the fraction).

A weight that is not a finite number >= 0 skips the sample as ``bad_weight``; one above
MAX_SAMPLE_WEIGHT is used as that, logged: uncapped, 1e9 would put one clip a billion
times into each epoch, and skipping would drop what curation's balancing (1/sqrt(cluster
size), mean 1) weights most: a rare cluster's clips, past 100 on sets of many millions.

Order and resume. Epoch e shuffles the shard list with (seed, e); data-parallel rank r
takes every dp_size-th shard from r, DataLoader worker w every num_workers-th of those.
A worker reads its shards in order; a position is (epoch, shard, sample, copy).
Decoded samples wait in their bucket until the bucket holds a batch. A worker's state
(data/shard_state.py) is its read cursor plus the positions still waiting in buckets: on
resume it re-reads only those, skips everything else before the cursor undecoded, and so
yields every sample of the epoch exactly once.

Bad data never stops iteration: the sample (or the rest of a truncated shard) is skipped,
logged with its key and shard, and counted by reason in ``ShardBatches.skipped``; a
sample with a member over ``data.max_member_bytes`` (``too_large``) or a repeated key
(``duplicate_key``: the later one) unread. A source silent for ``data.pipe_stall_s``
(data/sources.py) is a ``bad_shard``, like one that breaks off.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from data.buckets import Bucket, BucketGrid
from data.decode import Skip, check_caption, decode_image, decode_video
from data.loader import collate
from data.shard_state import FRESH_STATE, BucketBatches, Position, ReadProgress, ShardBatches
from data.sources import DEFAULT_STALL_S, open_source
from data.tars import READ_ERRORS, tar_samples
from data.video import uint8_to_video

log = logging.getLogger(__name__)

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_SAMPLE_WEIGHT = 100.0  # a larger json weight is used as this (module docstring)
DEFAULT_MAX_MEMBER_BYTES = 2**31  # data.max_member_bytes, as curation's max_member_bytes


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> None:
    """Write samples ``{"__key__": key, ext: bytes | str | dict}`` to a tar at `path`.

    str members are UTF-8 encoded, dicts JSON encoded. The tar is written to
    ``path + ".tmp"`` and renamed, so a reader never sees a half-written shard.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        with tarfile.open(tmp, "w") as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext, value in sample.items():
                    if ext == "__key__":
                        continue
                    if isinstance(value, dict):
                        value = json.dumps(value)
                    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_meta(members: dict[str, bytes]) -> dict[str, Any]:
    """A sample's ``json`` member as a dict ({} without one); raises Skip("bad_json")."""
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Skip("bad_json", str(err)) from err
    except RecursionError as err:  # nested thousands deep: the parser's stack runs out
        raise Skip("bad_json", f"RecursionError: {err}") from err
    if not isinstance(meta, dict):
        raise Skip("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def sample_weight(key: str, meta: dict[str, Any]) -> float:
    """Sample `key`'s json ``weight`` (1 without one), at most MAX_SAMPLE_WEIGHT; raises
    Skip("bad_weight") unless it is a finite number >= 0."""
    weight = meta.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) \
            or not 0 <= weight < math.inf:
        raise Skip("bad_weight", f"weight={weight!r} must be a finite number >= 0")
    if weight > MAX_SAMPLE_WEIGHT:
        log.warning("sample %s: weight %r is above %g, used as %g", key, weight,
                    MAX_SAMPLE_WEIGHT, MAX_SAMPLE_WEIGHT)
    return min(float(weight), MAX_SAMPLE_WEIGHT)


def read_caption(members: dict[str, bytes], meta: dict[str, Any]) -> str:
    """The sample's caption: its ``txt`` member, else its json ``caption``; raises
    Skip("missing_caption") when neither holds text, Skip("bad_caption") when it cannot be
    encoded (``check_caption``)."""
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members \
        else meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Skip("missing_caption")
    return check_caption(caption)


def expand_shards(pattern: str | list[str], key: str = "data.shards") -> list[str]:
    """Brace-expand shard patterns; local paths must exist (URLs and ``pipe:`` are kept).
    `key` is the config key the patterns came from, for the error message."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [url for p in patterns for url in braceexpand(p)]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or missing:
        found = "matches no shard" if len(missing) == len(urls) else "names missing shards"
        raise ValueError(f"{key}={pattern!r} {found}"
                         + (f": {len(missing)} of {len(urls)} are local files that do not "
                            f"exist, e.g. {missing[0]!r}" if missing else ""))
    return urls


class VideoShards(IterableDataset):
    """Batches {video (B, 3, T, H, W) in [-1, 1], fps (B,), caption, key, bucket [T, H, W]}
    of this data-parallel rank, each from one bucket. `epochs=None` loops forever,
    carrying part-filled buckets across epochs; a finite run flushes them at the end as
    smaller batches. Each batch also carries its worker's state under ``_state``.
    `weighted=False` uses every sample once per epoch whatever its ``weight`` (held-out
    sets). A subclass reading another sample format overrides ``load_sample`` and
    ``collate`` only (``data.latent_shards``). `stall_s` and `max_member_bytes` are
    ``data.pipe_stall_s`` and ``data.max_member_bytes``."""

    collate = staticmethod(collate)  # samples of one bucket -> one batch

    def __init__(self, shards: str | list[str], grid: BucketGrid, fps: float, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, epochs: int | None = None,
                 weighted: bool = True, key: str = "data.shards",
                 stall_s: float = DEFAULT_STALL_S,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        self.urls = expand_shards(shards, key)
        if len(self.urls) < dp_size:
            raise ValueError(f"{key}={shards!r} has {len(self.urls)} shards, fewer "
                             f"than the {dp_size} data-parallel ranks it must feed")
        self.grid, self.fps, self.seed, self.epochs = grid, fps, seed, epochs
        self.dp_rank, self.dp_size, self.weighted = dp_rank, dp_size, weighted
        self.stall_s, self.max_member_bytes = stall_s, max_member_bytes
        self.resume: dict[int, dict] = {}  # worker -> state; set before workers start

    def identity(self) -> dict[str, int]:
        """What a saved position is only valid for (with the loader's num_workers)."""
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "num_shards": len(self.urls)}

    @staticmethod
    def skipped_of(state: dict) -> Counter:
        return Counter(state["skipped"])

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        order = list(range(len(self.urls)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return [self.urls[i] for i in order[self.dp_rank::self.dp_size][worker::num_workers]]

    def read_shard(self, url: str, skipped: Counter
                   ) -> Iterator[tuple[int, str, dict[str, bytes] | Skip]]:
        """(index, key, {ext: bytes}) per sample in shard order, or (index, key, Skip) for
        one dropped unread (too_large, duplicate_key). A shard that breaks off or stalls
        ends there, counted as a bad_shard."""
        key = None
        try:
            with open_source(url, self.stall_s) as stream:
                for index, (key, members) in enumerate(tar_samples(stream,
                                                                   self.max_member_bytes)):
                    yield index, key, members if isinstance(members, dict) else Skip(*members)
        except (*READ_ERRORS, ValueError) as err:
            skipped["bad_shard"] += 1
            log.warning("skipping the rest of shard %s after sample %s: %s", url, key, err)
            return  # the half-read last sample is lost with the rest of the shard

    def copies(self, key: str, meta: dict, epoch: int) -> int:
        """How often the sample is used in `epoch`: its curation ``weight``, with the
        fraction a coin flip seeded by (seed, epoch, key), reproducible across resumes."""
        weight = sample_weight(key, meta)  # checked unweighted too: it is copied into caches
        if not self.weighted:
            return 1
        digest = hashlib.blake2b(f"{self.seed}/{epoch}/{key}".encode(), digest_size=8).digest()
        return math.floor(weight) + (int.from_bytes(digest, "big") / 2**64 < weight % 1)

    def load_sample(self, key: str, members: dict[str, bytes],
                    epoch: int) -> tuple[dict[str, Any] | None, int]:
        """(sample {video (3, T, H, W), fps, caption, key, bucket}, copies this epoch);
        (None, 0) when the weight drops it, undecoded. Raises Skip on bad data."""
        if not all(members.values()):
            raise Skip("empty_member", str([e for e, d in members.items() if not d]))
        meta = read_meta(members)
        caption = read_caption(members, meta)
        copies = self.copies(key, meta, epoch)
        if not copies:
            return None, 0
        video_ext = next((e for e in VIDEO_EXTS if e in members), None)
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if video_ext:
            frames, bucket = decode_video(members[video_ext], meta, self.fps, self.grid)
            # Movie Gen conditions the frame rate through the text.
            caption = f"{caption.strip()} FPS-{self.fps:g}"
        elif image_ext:
            frames, bucket = decode_image(members[image_ext], self.grid)
        else:
            raise Skip("no_media", f"members {sorted(members)}")
        sample = {"video": uint8_to_video(torch.from_numpy(frames)), "fps": self.fps,
                  "caption": caption.strip(), "key": key, "bucket": bucket}
        return sample, copies

    def load_or_skip(self, url: str, key: str, members: dict[str, bytes] | Skip, epoch: int,
                     skipped: Counter, count: int) -> tuple[dict[str, Any] | None, int]:
        """load_sample's (sample, copies); (None, 0) for a sample skipped or dropped by
        its weight, logged, with `count` (1, or 0 for one counted before) added to its
        reason in `skipped`."""
        try:
            if isinstance(members, Skip):
                raise members
            sample, copies = self.load_sample(key, members, epoch)
        except Skip as skip:
            skipped[skip.reason] += count
            log.warning("skipping sample %s of shard %s: %s", key, url, skip)
            return None, 0
        except Exception:  # a decoder failing in a way not foreseen above
            skipped["decode_error"] += count
            log.exception("skipping sample %s of shard %s", key, url)
            return None, 0
        if sample is None:
            skipped["dropped_by_weight"] += count
        return sample, copies

    def epoch_samples(self, epoch: int, shards: list[str], progress: ReadProgress,
                      replay: set[Position]) -> Iterator[tuple[Position, Bucket, dict[str, Any]]]:
        """(position, bucket, sample) per use in `epoch` of each sample of `shards` (this
        worker's, in the epoch's order): the uses at or after ``progress.cursor``, and
        those in `replay`. The cursor moves past each use before it is yielded and past
        each sample skipped; only samples at or after the cursor count their skips."""
        replay_samples = {p.first_copy() for p in replay}
        for s, url in enumerate(shards):
            # read to its end before the checkpoint, its errors counted then
            consumed = Position(epoch, s + 1) <= progress.cursor
            if consumed and not any((p.epoch, p.shard) == (epoch, s) for p in replay):
                continue  # and no sample of it waits in a bucket: not even opened
            for i, key, members in self.read_shard(url, Counter() if consumed
                                                   else progress.skipped):
                at = Position(epoch, s, i)
                is_fresh = at >= progress.cursor.first_copy()
                if not is_fresh and at not in replay_samples:
                    continue
                first_copy = progress.cursor.copy if at == progress.cursor.first_copy() else 0
                if is_fresh:
                    progress.cursor = Position(epoch, s, i + 1)
                sample, copies = self.load_or_skip(url, key, members, epoch, progress.skipped,
                                                   is_fresh)
                if sample is None:
                    continue
                bucket = sample.pop("bucket")
                for use in (at._replace(copy=c) for c in range(copies)):
                    if not (is_fresh and use.copy >= first_copy) and use not in replay:
                        continue
                    if is_fresh:  # a batch emitted now must not lose the copies to come
                        progress.cursor = use.after(copies)
                    yield use, bucket, sample
            progress.cursor = max(progress.cursor, Position(epoch, s + 1))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        state = self.resume.get(worker, FRESH_STATE)
        progress = ReadProgress(Position(*state["cursor"]), Counter(state["skipped"]))
        replay = {Position(*p) for p in state["pending"]}
        buckets = BucketBatches(self.grid, self.collate, progress, worker)
        epoch = min([progress.cursor, *replay]).epoch
        while self.epochs is None or epoch < self.epochs:
            shards = self.worker_shards(epoch, worker, num_workers)
            if not shards:  # more workers than this rank has shards
                return
            whole_epoch, used = progress.cursor <= Position(epoch), False
            for position, bucket, sample in self.epoch_samples(epoch, shards, progress, replay):
                used = True
                batch = buckets.add(position, bucket, sample)
                if batch is not None:
                    yield batch
            if whole_epoch and not used:  # else it would loop forever, yielding nothing
                log.error("worker %d of dp rank %d found no usable sample in epoch %d of "
                          "shards %s; it stops", worker, self.dp_rank, epoch, shards)
                yield buckets.tagged({})  # no batch: only the skip counts, for the error
                return
            epoch += 1
            progress.cursor = max(progress.cursor, Position(epoch))
        yield from buckets.flush()  # the last epoch's part-filled buckets
        yield buckets.tagged({})  # no batch: the samples skipped after the last one still count


class MixedShards(IterableDataset):
    """Video batches interleaved with batches from separate image shards, `image_ratio`
    image samples per video sample (Movie Gen mixes about 1:10 in joint stages).

    Both are VideoShards streams, each with its own split by dp rank and worker, its own
    epochs and its own resume state. A worker takes its next batch from the image stream
    while its images yielded are fewer than `image_ratio` times its videos yielded, else
    from the video stream, so its sample ratio stays within one batch of the target. The
    choice depends only on those counts, kept in the worker state with both streams'
    states, so a resumed worker continues the same sequence. The "image" stream is
    whatever the image shards hold; a stream that ends leaves the other to go on alone.
    """

    def __init__(self, videos: VideoShards, images: VideoShards, image_ratio: float):
        self.streams = {"video": videos, "image": images}
        self.image_ratio, self.epochs = image_ratio, videos.epochs
        self.resume: dict[int, dict] = {}  # worker -> state; set before workers start

    def identity(self) -> dict[str, int]:
        return {**self.streams["video"].identity(),
                "num_image_shards": len(self.streams["image"].urls)}

    @staticmethod
    def skipped_of(state: dict) -> Counter:
        return Counter(state["video"]["skipped"]) + Counter(state["image"]["skipped"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        state = self.resume.get(worker, {"video": FRESH_STATE, "image": FRESH_STATE,
                                         "samples": {"video": 0, "image": 0}})
        states = {name: state[name] for name in self.streams}
        counts = dict(state["samples"])
        live = {}
        for name, stream in self.streams.items():
            stream.resume = {worker: states[name]}
            live[name] = iter(stream)
        while live:
            name = "image" if counts["image"] < self.image_ratio * counts["video"] else "video"
            name = name if name in live else next(iter(live))
            batch = next(live[name], None)
            if batch is None:
                del live[name]
                continue
            del batch["_worker"]
            states[name] = batch.pop("_state")
            counts[name] += len(batch.get("key", ()))
            yield {**batch, "_worker": worker,
                   "_state": {**states, "samples": dict(counts)}}


@dataclass
class WebDatasetConfig:
    shards: str = "shards/{000000..000009}.tar"
    fps: float = 16.0
    # (height, width) per aspect ratio: 1:1, 16:9, 9:16, 4:3, 3:4 at ~256² pixels.
    sizes: list[list[int]] = field(default_factory=lambda: [
        [256, 256], [192, 336], [336, 192], [224, 288], [288, 224]])
    durations: list[int] = field(default_factory=lambda: [32, 64, 128, 192, 256])
    batch_sizes: list[int] = field(default_factory=lambda: [8, 4, 2, 1, 1])  # per dp rank
    image_batch_size: int = 16
    num_workers: int = 2
    prefetch_factor: int = 2
    seed: int = 0
    image_shards: str | None = None  # separate image shards, mixed in at image_ratio
    image_ratio: float = 0.1  # image samples per video sample yielded, with image_shards
    val_shards: str | None = None  # held-out shards: validation reads all of them, in order
    pipe_stall_s: float = DEFAULT_STALL_S  # a pipe:/http(s) shard silent this long: abandoned
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger member's sample: skipped

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"data.fps={self.fps} must be positive")
        for key in ("image_shards", "val_shards"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"data.{key}={value!r} names no shard; give a shard pattern "
                                 f"or null for none")
        if not 0 < self.image_ratio < math.inf:
            raise ValueError(f"data.image_ratio={self.image_ratio} must be a finite number "
                             f"> 0 (image samples per video sample, e.g. 0.1 for 1:10); to "
                             f"train without the separate images set data.image_shards=null")
        if not 0 < self.pipe_stall_s < math.inf:
            raise ValueError(f"data.pipe_stall_s={self.pipe_stall_s} must be a finite number "
                             f"of seconds > 0: a pipe: or http(s) shard that sends no byte "
                             f"for that long is abandoned as a bad shard")
        if self.max_member_bytes < 1:
            raise ValueError(f"data.max_member_bytes={self.max_member_bytes} must be >= 1 "
                             f"(a sample with a larger tar member is skipped unread)")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0 and "
                             f"data.prefetch_factor={self.prefetch_factor} >= 1")
        try:
            self.grid()
        except ValueError as err:
            raise ValueError(f"data.{err}") from None

    def grid(self) -> BucketGrid:
        return BucketGrid(self.sizes, self.durations, self.batch_sizes, self.image_batch_size)

    def reader(self) -> type[VideoShards]:
        """The dataset class that reads these shards (video shards here)."""
        return VideoShards

    def dataset(self, shards: str, key: str, **options: Any) -> VideoShards:
        """The reader of `shards`, from config key `key`, with this config's grid, fps,
        seed and source limits; `options` are VideoShards' (dp_rank, epochs, ...)."""
        return self.reader()(shards, self.grid(), self.fps, self.seed, key=key,
                             stall_s=self.pipe_stall_s,
                             max_member_bytes=self.max_member_bytes, **options)


def build_shard_batches(cfg: WebDatasetConfig, dp_rank: int, dp_size: int,
                        epochs: int | None = None) -> ShardBatches:
    """This dp rank's training batches: `cfg.shards`, mixed with `cfg.image_shards` if set."""
    split = dict(dp_rank=dp_rank, dp_size=dp_size, epochs=epochs)
    dataset = cfg.dataset(cfg.shards, "data.shards", **split)
    if cfg.image_shards is not None:
        images = cfg.dataset(cfg.image_shards, "data.image_shards", **split)
        readers = dp_size * max(1, cfg.num_workers)
        if len(images.urls) < readers:  # a worker without image shards would yield no image
            raise ValueError(
                f"data.image_shards={cfg.image_shards!r} has {len(images.urls)} shards, fewer "
                f"than the {readers} readers (dp size {dp_size} x data.num_workers="
                f"{cfg.num_workers}) that each need one to keep data.image_ratio; split the "
                f"images into more shards or lower data.num_workers")
        dataset = MixedShards(dataset, images, cfg.image_ratio)
    return ShardBatches(dataset, cfg.num_workers, cfg.prefetch_factor)


def build_val_shard_batches(cfg: WebDatasetConfig) -> ShardBatches:
    """Every val shard, in a fixed order, each sample once (curation weights ignored), in
    this process: every rank runs the same batches, as sharded models need."""
    dataset = cfg.dataset(cfg.val_shards, "data.val_shards", epochs=1, weighted=False)
    return ShardBatches(dataset, num_workers=0)
