"""Aspect-ratio × duration buckets: every batch is drawn from one bucket, so its samples
share one (T, H, W) shape and the DiT sees one latent shape per step.

A sample goes to the frame size whose aspect ratio is nearest its own (in log space, so
2:1 and 1:2 are equally far from 1:1) and to the longest duration, in frames at the
target fps, that the clip can fill. Images are one-frame videos: they get T = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """Shape (frames, height, width) of every video in the bucket."""

    frames: int
    height: int
    width: int


class BucketGrid:
    """`sizes`: (height, width) frame sizes, one per aspect ratio; `durations`: lengths
    in frames; `batch_sizes[i]`: samples per batch of `durations[i]`-frame buckets;
    `image_batch_size`: samples per batch of images (T = 1)."""

    def __init__(self, sizes: Sequence[Sequence[int]], durations: Sequence[int],
                 batch_sizes: Sequence[int], image_batch_size: int):
        # Messages start with the config key (data.<key> in a WebDatasetConfig).
        if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
            raise ValueError(f"sizes={list(sizes)} must be one or more positive "
                             f"[height, width] pairs")
        if not durations or len(set(durations)) != len(durations) or min(durations) < 1:
            raise ValueError(f"durations={list(durations)} must be one or more distinct "
                             f"positive frame counts")
        if len(batch_sizes) != len(durations) or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes={list(batch_sizes)} must give one positive batch "
                             f"size per duration in durations={list(durations)}")
        if image_batch_size < 1:
            raise ValueError(f"image_batch_size={image_batch_size} must be positive")
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.durations = sorted(int(d) for d in durations)
        self._batch = {int(d): int(b) for d, b in zip(durations, batch_sizes, strict=True)}
        # Images share T = 1 with a 1-frame duration, if listed; its batch size wins.
        self._batch.setdefault(1, image_batch_size)

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The bucket frame size whose aspect ratio is nearest height:width."""
        aspect = math.log(width / height)
        return min(self.sizes, key=lambda s: abs(math.log(s[1] / s[0]) - aspect))

    def assign(self, height: int, width: int, available_frames: int | None) -> Bucket | None:
        """Bucket of a video that can fill `available_frames` frames at the target fps
        (None: an image); None when the clip is shorter than every duration."""
        h, w = self.size_for(height, width)
        if available_frames is None:
            return Bucket(1, h, w)
        fitting = [d for d in self.durations if d <= available_frames]
        return Bucket(fitting[-1], h, w) if fitting else None

    def batch_size(self, bucket: Bucket) -> int:
        return self._batch[bucket.frames]

    def shapes(self) -> list[Bucket]:
        """Every bucket a sample can land in, images included."""
        frames = sorted({1, *self.durations})
        return [Bucket(t, h, w) for t in frames for h, w in self.sizes]
