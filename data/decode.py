"""Sample bytes -> uint8 frames (T, H, W, 3) in their bucket: PyAV decode at the target
fps from the clip start, cover-resize and centre-crop with OpenCV.

Bad data raises `Skip` with a reason (the loader's counter key), never anything else
foreseen: the loader skips the sample and counts it.
"""

from __future__ import annotations

import io
import math

import av
import cv2
import numpy as np
from PIL import Image

from data.buckets import Bucket, BucketGrid

# Decoding runs in DataLoader workers that share the cores, each already on one torch
# thread; OpenCV would start a pool of one thread per core in each. Set once at import,
# before any worker forks: setting it inside a forked worker can deadlock on the pool's
# lock when the parent had used OpenCV threads.
cv2.setNumThreads(1)


class Skip(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def cover_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (height, width, 3): scaled to cover height x width, centre-cropped.

    Only the source window that survives the crop is resized, rounded to whole source
    pixels (less than one output pixel off). A shrink by k or more is first an exact
    k x k box average (OpenCV's fast integer INTER_AREA), then bilinear: swscale's resize
    of the whole frame was ~5x slower at 768 px, OpenCV's non-integer INTER_AREA ~10x.
    """
    src_h, src_w = image.shape[:2]
    scale = max(height / src_h, width / src_w)
    box = max(1, int(1 / scale + 1e-9))  # whole part of the shrink factor
    crop_h, crop_w = min(src_h, round(height / scale)), min(src_w, round(width / scale))
    crop_h, crop_w = crop_h - crop_h % box, crop_w - crop_w % box
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    window = image[top: top + crop_h, left: left + crop_w]
    if box > 1:
        window = cv2.resize(window, (crop_w // box, crop_h // box), interpolation=cv2.INTER_AREA)
    if window.shape[:2] == (height, width):
        return window.copy()  # a writable array of its own, like cv2.resize's
    return cv2.resize(window, (width, height), interpolation=cv2.INTER_LINEAR)


def decode_image(data: bytes, grid: BucketGrid) -> tuple[np.ndarray, Bucket]:
    """Image bytes -> uint8 frames (1, H, W, 3) in its T = 1 bucket."""
    try:
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError) as err:
        raise Skip("corrupt_image", str(err)) from err
    bucket = grid.assign(image.shape[0], image.shape[1], None)
    return cover_crop(image, bucket.height, bucket.width)[None], bucket


def meta_number(meta: dict, name: str, default: float | None) -> float | None:
    """A non-negative finite number from the json metadata (seconds or a weight)."""
    value = meta.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0 <= value < math.inf):
        raise Skip("bad_json", f"{name}={value!r} must be a finite number >= 0")
    return value


def check_caption(caption: str) -> str:
    """The caption, if a text encoder can take it. A lone UTF-16 surrogate ("\\ud800" in
    JSON) decodes to a str with no UTF-8 form; every tokenizer encodes to UTF-8 first, so it
    would fail inside the training step, and again on every resume at the same batch."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        raise Skip("bad_caption", f"{err.reason} at character {err.start}") from err
    return caption


def decode_video(data: bytes, meta: dict, fps: float,
                 grid: BucketGrid) -> tuple[np.ndarray, Bucket]:
    """Video bytes -> uint8 frames (T, H, W, 3) sampled at `fps` from the clip start.

    Frame k is the first source frame at or after ``start + k / fps`` less half a source
    frame period, so a slower source repeats frames and a faster one drops them.
    """
    start, end = meta_number(meta, "start", 0.0), meta_number(meta, "end", None)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise Skip("no_video_stream")
            stream = container.streams.video[0]
            if getattr(stream, "codec_context", None) is None:
                raise Skip("unsupported_codec", "this FFmpeg build has no decoder for it")
            ctx = stream.codec_context
            if end is None:
                seconds = (float(stream.duration * stream.time_base) if stream.duration
                           else (container.duration or 0) / av.time_base)
                end = seconds or meta_number(meta, "duration", 0.0)
            available = math.floor((end - start) * fps + 1e-6)
            bucket = grid.assign(ctx.height, ctx.width, available)
            if bucket is None:
                raise Skip("too_short", f"{available} frames at {fps} fps, shortest bucket "
                                        f"is {grid.durations[0]}")
            if start > 0:
                container.seek(int(start / stream.time_base), stream=stream)
            src_fps = float(stream.average_rate or stream.guessed_rate or fps)
            slack = 0.5 / src_fps
            frames: list[np.ndarray] = []
            for frame in container.decode(stream):
                fitted = None
                time = frame.time if frame.time is not None else math.inf
                while len(frames) < bucket.frames and time >= start + len(frames) / fps - slack:
                    if fitted is None:
                        rgb = frame.to_ndarray(format="rgb24")
                        fitted = cover_crop(rgb, bucket.height, bucket.width)
                    frames.append(fitted)
                if len(frames) == bucket.frames:
                    return np.stack(frames), bucket
    except av.FFmpegError as err:
        raise Skip("corrupt_video", str(err)) from err
    raise Skip("too_few_frames", f"decoded {len(frames)} of {bucket.frames} frames")
