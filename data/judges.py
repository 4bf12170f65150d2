"""Judges of the synthetic set: what colour, shape, direction and speed a video shows.

They know no model: a video (3, T, H, W) in [-1, 1] goes in, names come out, in the
vocabulary of the captions (``data.synthetic``), or "none" where the video shows no
clear answer (black, speckle, several blobs, no motion). A text-to-video model follows
its prompt when the judges of its samples agree with the words of the prompt.

- colour: a majority vote of the clearly coloured pixels over the whole clip;
- the object of a frame: the largest 8-connected blob of clearly coloured pixels, kept
  only when it holds most of the frame's coloured pixels and is big enough to be a
  shape (scattered speckle fails both);
- direction and speed: the least-squares slope of the object's centroid over frames;
  the dominant axis and its sign give the direction, the slope's size the speed;
- shape: per frame, which corners of its bounding box the object fills (square: all,
  circle: none, the apex-up triangle: the bottom two) and how much of the box it fills,
  then a majority vote over frames.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from data.synthetic import COLOURS, DIRECTIONS, SHAPE_FRACTION, SHAPES, SPEEDS

# "Clearly not background", in [0, 1] units: bright enough and coloured enough. The
# chroma test keeps grey haze out; grey sits nearer the secondary colours.
MIN_VALUE = 0.5
MIN_CHROMA = 0.25
# An object is at least this fraction of the caption shape's box (a triangle fills 1/2)
# and holds at least this fraction of its frame's coloured pixels.
MIN_OBJECT_AREA = 0.2
MIN_OBJECT_SHARE = 0.6
# A clip must show its object in at least this fraction of its frames.
MIN_OBJECT_FRAMES = 0.5
# Slopes below this fraction of the slow speed count as standing still.
MIN_MOTION = 0.4
# ... and at most this many times the caption shape's box (dense noise is one big blob).
MAX_OBJECT_AREA = 4.0
# Shape thresholds, calibrated on the set's clips after an mp4 round trip at 32-48 px:
# the corner regions' side as a fraction of the box side, and bounds on the box fill
# (measured: square 0.92-1, circle 0.67-0.92, triangle 0.51-0.75).
CORNER_FRACTION = 0.2
SQUARE_MIN_FILL = 0.86
CIRCLE_MIN_FILL = 0.6
CIRCLE_MAX_FILL = 0.95
NONE = "none"


@dataclass(frozen=True)
class Judgement:
    """What a video shows, each field a caption word or "none"."""

    colour: str
    shape: str
    direction: str
    speed: str


def _pixels01(video: torch.Tensor) -> torch.Tensor:
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got shape {tuple(video.shape)}")
    return ((video.detach().float().cpu() + 1) / 2).clamp(0, 1)


def coloured_mask(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> (T, H, W) bool: the clearly coloured pixels."""
    pixels = _pixels01(video)
    top, bottom = pixels.max(dim=0).values, pixels.min(dim=0).values
    return (top >= MIN_VALUE) & (top - bottom >= MIN_CHROMA)


def dominant_colour(video: torch.Tensor) -> str:
    """Name of the COLOURS entry most clearly coloured pixels are nearest to, or "none".

    A majority vote shrugs off codec-blurred edges that a mean would absorb.
    """
    pixels = _pixels01(video).reshape(3, -1).T[coloured_mask(video).reshape(-1)]
    if len(pixels) == 0:
        return NONE
    names = tuple(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) / 255
    nearest = torch.cdist(pixels, palette).argmin(dim=1)
    return names[torch.bincount(nearest, minlength=len(names)).argmax().item()]


def frame_object(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool -> the frame's object as an (H, W) bool mask, or None when the
    coloured pixels are not one clear blob of about shape size."""
    height, width = mask.shape
    total = int(mask.sum())
    side = SHAPE_FRACTION * min(height, width)
    if total < MIN_OBJECT_AREA * side * side:
        return None
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    largest = int(sizes.argmax()) + 1
    size = sizes[largest - 1]
    if not MIN_OBJECT_AREA * side * side <= size <= MAX_OBJECT_AREA * side * side or \
            size < MIN_OBJECT_SHARE * total:
        return None
    return labels == largest


def object_masks(video: torch.Tensor) -> list[np.ndarray | None]:
    """Per frame, the object mask or None (see ``frame_object``)."""
    return [frame_object(frame) for frame in coloured_mask(video).numpy()]


def _centroid(blob: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(blob)
    return float(ys.mean()), float(xs.mean())


def judge_motion(video: torch.Tensor) -> tuple[str, str]:
    """(direction, speed) of the object's centroid track, or ("none", "none")."""
    frames, width = video.shape[1], video.shape[3]
    track = [(index, _centroid(blob)) for index, blob in enumerate(object_masks(video))
             if blob is not None]
    if frames < 2 or len(track) < max(2, MIN_OBJECT_FRAMES * frames):
        return NONE, NONE
    index = np.array([i for i, _ in track], dtype=np.float64)
    centres = np.array([c for _, c in track], dtype=np.float64)
    slope_y, slope_x = np.polyfit(index, centres, 1)[0]
    # Speeds are fractions of the frame width per frame, on both axes (data.synthetic).
    speed = max(abs(slope_y), abs(slope_x)) / width
    if speed < MIN_MOTION * min(SPEEDS.values()):
        return NONE, NONE
    step = (int(np.sign(slope_y)), 0) if abs(slope_y) > abs(slope_x) else \
        (0, int(np.sign(slope_x)))
    direction = next(name for name, d in DIRECTIONS.items() if d == step)
    # Nearest named speed on a log scale (the names differ by a factor).
    speed_name = min(SPEEDS, key=lambda name: abs(np.log(speed / SPEEDS[name])))
    return direction, speed_name


def blob_shape(blob: np.ndarray) -> str:
    """(H, W) bool object -> "square", "circle", "triangle" or "none".

    By the fill of the corners of its bounding box: a square fills all four, a circle
    none, the apex-up triangle its two bottom corners only; the box fill separates a
    square from a blurred circle whose corners bled in.
    """
    ys, xs = np.nonzero(blob)
    box = blob[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    height, width = box.shape
    if not 0.5 <= height / width <= 2.0:
        return NONE
    c = max(1, round(CORNER_FRACTION * min(height, width)))
    top = (box[:c, :c].mean() + box[:c, -c:].mean()) / 2
    bottom = (box[-c:, :c].mean() + box[-c:, -c:].mean()) / 2
    fill = box.mean()
    if bottom - top >= 0.5:
        return "triangle"
    if min(top, bottom) >= 0.5 and fill >= SQUARE_MIN_FILL:
        return "square"
    if max(top, bottom) <= 0.5 and CIRCLE_MIN_FILL <= fill < CIRCLE_MAX_FILL:
        return "circle"
    return NONE


def judge_shape(video: torch.Tensor) -> str:
    """Majority vote over frames of ``blob_shape``; "none" when fewer than half of the
    frames show an object or no shape wins a majority of the frames with one."""
    blobs = [blob for blob in object_masks(video) if blob is not None]
    if len(blobs) < MIN_OBJECT_FRAMES * video.shape[1]:
        return NONE
    votes = Counter(blob_shape(blob) for blob in blobs)
    shape, count = votes.most_common(1)[0]
    return shape if count > len(blobs) / 2 else NONE


def judge_video(video: torch.Tensor) -> Judgement:
    direction, speed = judge_motion(video)
    return Judgement(dominant_colour(video), judge_shape(video), direction, speed)


def _word_in(caption: str, vocabulary: tuple[str, ...], what: str) -> str | None:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    found = [name for name in vocabulary if name in words]
    if len(found) > 1:
        raise ValueError(f"caption {caption!r} names several {what}s: {found}")
    return found[0] if found else None


def colour_in_caption(caption: str) -> str | None:
    """The COLOURS name ``caption`` mentions as a whole word, or None if it names none.

    A caption naming two different colours raises ValueError: no single colour to check.
    """
    return _word_in(caption, tuple(COLOURS), "colour")


def caption_judgement(caption: str) -> Judgement:
    """What a caption asks for, "none" for attributes it does not name."""
    return Judgement(*(_word_in(caption, vocabulary, what) or NONE for vocabulary, what in (
        (tuple(COLOURS), "colour"), (SHAPES, "shape"), (tuple(DIRECTIONS), "direction"),
        (tuple(SPEEDS), "speed"))))


ATTRIBUTES = ("colour", "shape", "direction", "speed")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES),
          "direction": 1 / len(DIRECTIONS), "speed": 1 / len(SPEEDS)}


def match_rates(videos: list[torch.Tensor], captions: list[str]) -> dict[str, float]:
    """Fraction of videos whose judged attribute equals the caption's, per attribute
    (attributes a caption does not name are not counted)."""
    hits, named = Counter(), Counter()
    for video, caption in zip(videos, captions, strict=True):
        asked, seen = caption_judgement(caption), judge_video(video)
        for attribute in ATTRIBUTES:
            if getattr(asked, attribute) != NONE:
                named[attribute] += 1
                hits[attribute] += getattr(asked, attribute) == getattr(seen, attribute)
    return {attribute: hits[attribute] / named[attribute] for attribute in ATTRIBUTES
            if named[attribute]}
