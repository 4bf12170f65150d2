"""Model-score hook (OCR, aesthetics) and one offline, honest implementation.

A `ClipScorer` maps a clip to one float; `ScoreFilter` keeps clips whose score lies in
a range. Plug a real OCR or aesthetic model in by implementing `ClipScorer`.

`TextAreaHeuristic` is NOT a model and does not read text: it estimates the fraction
of the frame covered by text-line-like regions (dense edges that merge into wide,
short blobs), the classic pre-OCR text localisation trick. It catches burnt-in
subtitles, captions and slides; it can also fire on fences, blinds and other fine
horizontal texture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from .clip import Clip, Decision


class ClipScorer(Protocol):
    """Anything that scores a clip; `name` becomes the score's json key."""

    name: str

    def __call__(self, clip: Clip) -> float: ...


@dataclass
class TextAreaHeuristic:
    """Fraction of the frame covered by text-line-like edge blobs (max over frames).

    Canny edges are closed with a horizontal kernel so the strokes of a line of text
    merge into one solid bar, then opened with a 3x3 kernel so that thin edges of the
    scene (contours, texture) vanish. Bars that are wide (>= min_width of the frame,
    aspect >= min_aspect), not too tall (<= max_height of the frame) and dense in edges
    (>= min_density) count as text.
    """

    num_frames: int = 3
    canny_low: int = 50
    canny_high: int = 150
    min_aspect: float = 2.0
    min_width: float = 0.2
    max_height: float = 0.2
    min_density: float = 0.15
    char_gap: float = 1 / 24  # widest gap joined within a line, as a fraction of width
    name = "text_area"

    def frame_score(self, frame: np.ndarray) -> float:
        height, width = frame.shape
        edges = cv2.Canny(frame, self.canny_low, self.canny_high)
        kernel_w = max(3, round(width * self.char_gap))
        bars = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, np.ones((1, kernel_w), np.uint8))
        bars = cv2.morphologyEx(bars, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        count, _, stats, _ = cv2.connectedComponentsWithStats((bars > 0).astype(np.uint8))
        area = 0
        for x, y, w, h, _ in stats[1:count]:  # label 0 is the background
            if w < max(self.min_aspect * h, self.min_width * width) or h > self.max_height * height:
                continue
            density = np.count_nonzero(edges[y:y + h, x:x + w]) / (w * h)
            if density >= self.min_density:
                area += w * h
        return area / (height * width)

    def __call__(self, clip: Clip) -> float:
        luma = clip.luma()
        picks = np.linspace(0, len(luma) - 1, min(self.num_frames, len(luma))).round()
        return max(self.frame_score(luma[int(i)]) for i in picks)


@dataclass
class ScoreFilter:
    """Keeps clips whose `scorer(clip)` lies in [min_score, max_score]."""

    scorer: ClipScorer
    min_score: float = float("-inf")
    max_score: float = float("inf")

    @property
    def name(self) -> str:
        return self.scorer.name

    def __call__(self, clip: Clip) -> Decision:
        score = float(self.scorer(clip))
        scores = {self.scorer.name: round(score, 4)}
        if score < self.min_score:
            return Decision(False, f"{self.name} {score:.3f} < {self.min_score}", scores)
        if score > self.max_score:
            return Decision(False, f"{self.name} {score:.3f} > {self.max_score}", scores)
        return Decision(True, "ok", scores)
