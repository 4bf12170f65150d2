"""Preference pairs from webdataset tar shards: a caption, a preferred and a rejected video
(or image), raw (``data=preference``) or as cached latents (``data=preference_latents``,
written by ``python -m trainer.precompute`` from raw preference shards).

Raw sample layouts (members share a key, as in data/shards.py), either of:
- ours: ``KEY.win.EXT`` (preferred) and ``KEY.lose.EXT`` (rejected), EXT a video
  (mp4|webm|mkv|mov) or image (jpg|jpeg|png|webp) extension;
- Pick-a-Pic's (arXiv 2305.01569): ``KEY.EXT_0`` and ``KEY.EXT_1`` (its ``jpg_0``/``jpg_1``
  columns; ``mp4_0``/``mp4_1`` for videos) with ``label_0`` and ``label_1`` in
  ``KEY.json``: the side whose label is 1 is preferred, 0.5/0.5 is a tie.
Plus the caption in ``KEY.txt`` or the json's ``caption``, and the json metadata of
data/shards.py (clip ``start``/``end``, sampling ``weight``) applying to both sides.

A pair is one bucket: the preferred side picks it (aspect ratio and duration as for a
single video) and the rejected side is decoded into the same shape, so both sides of
every pair, and every pair of a batch, share one latent shape.

Bad pairs are skipped and counted by reason like any bad sample: ``missing_side`` (one
of the two media), ``identical_sides`` (the same bytes twice: no preference to learn),
``tie`` (equal labels), ``missing_label`` / ``bad_label`` (Pick-a-Pic labels absent, or
not two numbers in [0, 1] that sum to 1), ``mixed_media`` (an image against a video), and
the decode reasons of data/decode.py for either side.

Cached pairs: ``KEY.safetensors`` holds ``latent_win`` and ``latent_lose`` besides the text
encodings; everything else is the cache format of data/latent_shards.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.buckets import Bucket, BucketGrid
from data.decode import Skip, decode_image, decode_video
from data.latent_shards import LatentDataConfig, LatentShards
from data.shards import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    VideoShards,
    WebDatasetConfig,
    read_caption,
    read_meta,
)
from data.video import uint8_to_video

SIDES = ("win", "lose")
Media = tuple[str, bytes]  # (extension, bytes) of one side


def find_media(members: dict[str, bytes], name: str) -> Media | None:
    """The first member named ``name.format(ext=EXT)`` for a media extension EXT."""
    for ext in (*VIDEO_EXTS, *IMAGE_EXTS):
        if (member := name.format(ext=ext)) in members:
            return ext, members[member]
    return None


def preferred_index(meta: dict[str, Any]) -> int:
    """0 or 1: the Pick-a-Pic side whose label marks it preferred. Raises Skip."""
    labels = [meta.get(f"label_{i}") for i in (0, 1)]
    if any(label is None for label in labels):
        raise Skip("missing_label", "Pick-a-Pic pairs need label_0 and label_1 in KEY.json")
    if any(isinstance(label, bool) or not isinstance(label, int | float) or
           not 0 <= label <= 1 for label in labels) or not math.isclose(sum(labels), 1):
        raise Skip("bad_label", f"label_0={labels[0]!r}, label_1={labels[1]!r} must be numbers "
                                f"in [0, 1] summing to 1")
    if labels[0] == labels[1]:
        raise Skip("tie", "label_0 = label_1")
    return 0 if labels[0] > labels[1] else 1


def pair_members(members: dict[str, bytes], meta: dict[str, Any]) -> tuple[Media, Media]:
    """(preferred, rejected) media of a raw sample in either layout. Raises Skip."""
    ours = [find_media(members, f"{side}.{{ext}}") for side in SIDES]
    picks = [find_media(members, f"{{ext}}_{i}") for i in (0, 1)]
    if any(ours):
        sides = ours
    elif any(picks):
        sides = picks
    else:
        raise Skip("no_media", f"members {sorted(members)}; a pair needs KEY.win.EXT and "
                               f"KEY.lose.EXT, or Pick-a-Pic's KEY.EXT_0 and KEY.EXT_1")
    if not all(sides):
        raise Skip("missing_side", f"members {sorted(members)}")
    if sides[0][1] == sides[1][1]:
        raise Skip("identical_sides", "both sides are the same bytes")
    if sides is picks:
        first = preferred_index(meta)
        sides = [picks[first], picks[1 - first]]
    win, lose = sides
    if (win[0] in VIDEO_EXTS) != (lose[0] in VIDEO_EXTS):
        raise Skip("mixed_media", f"a {win[0]} against a {lose[0]}")
    return win, lose


def decode_side(media: Media, meta: dict[str, Any], fps: float,
                grid: BucketGrid) -> tuple[np.ndarray, Bucket]:
    ext, data = media
    if ext in VIDEO_EXTS:
        return decode_video(data, meta, fps, grid)
    return decode_image(data, grid)


def pinned(bucket: Bucket) -> BucketGrid:
    """A grid of one bucket: a side decoded in it is cover-cropped to that size and takes
    that many frames (or is too short)."""
    return BucketGrid([[bucket.height, bucket.width]], [bucket.frames], [1], 1)


def collate_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs of one bucket -> video_win, video_lose (B, 3, T, H, W), fps (B,), caption, key."""
    return {
        **{f"video_{side}": torch.stack([s[f"video_{side}"] for s in samples])
           for side in SIDES},
        "fps": torch.tensor([float(s["fps"]) for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class PreferenceShards(VideoShards):
    """VideoShards over raw preference pairs: batches of both sides' videos."""

    collate = staticmethod(collate_pairs)

    def load_sample(self, key: str, members: dict[str, bytes],
                    epoch: int) -> tuple[dict[str, Any] | None, int]:
        """(pair {video_win, video_lose (3, T, H, W), fps, caption, key, bucket}, copies
        this epoch); (None, 0) when the weight drops it, undecoded. Raises Skip."""
        if not all(members.values()):
            raise Skip("empty_member", str([e for e, d in members.items() if not d]))
        meta = read_meta(members)
        caption = read_caption(members, meta).strip()
        win, lose = pair_members(members, meta)
        copies = self.copies(key, meta, epoch)
        if not copies:
            return None, 0
        frames_win, bucket = decode_side(win, meta, self.fps, self.grid)
        frames_lose, _ = decode_side(lose, meta, self.fps, pinned(bucket))
        if win[0] in VIDEO_EXTS:  # the frame-rate tag of data/shards.py (Movie Gen)
            caption = f"{caption} FPS-{self.fps:g}"
        return {"video_win": uint8_to_video(torch.from_numpy(frames_win)),
                "video_lose": uint8_to_video(torch.from_numpy(frames_lose)),
                "fps": self.fps, "caption": caption, "key": key, "bucket": bucket}, copies


class PreferenceLatentShards(LatentShards):
    """LatentShards over cached pairs: batches of latent_win, latent_lose and the text."""

    latent_names = ("latent_win", "latent_lose")


@dataclass
class PreferenceDataConfig(WebDatasetConfig):
    """``data=preference``: raw preference shards (either layout above)."""

    shards: str = "preference/{000000..000009}.tar"

    def reader(self) -> type[VideoShards]:
        return PreferenceShards


@dataclass
class PreferenceLatentDataConfig(LatentDataConfig):
    """``data=preference_latents``: preference pairs cached by trainer.precompute."""

    shards: str = "preference_cache/{000000..000009}.tar"

    def reader(self) -> type[VideoShards]:
        return PreferenceLatentShards


def is_preference(data: Any) -> bool:
    """Whether a data config yields preference pairs (raw or cached)."""
    return isinstance(data, PreferenceDataConfig | PreferenceLatentDataConfig)
