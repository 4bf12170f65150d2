"""Cheap filters: container probe, resolution, aspect ratio, duration, caption length.

These read only the probe or the caption, so they run first and spare the decode of
most rejected clips.
"""

from __future__ import annotations

from dataclasses import dataclass

from .clip import Clip, Decision, ProbeError


@dataclass
class ProbeFilter:
    """Decodable, has a video stream, and a known duration and frame rate."""

    name = "probe"

    def __call__(self, clip: Clip) -> Decision:
        try:
            p = clip.probe
        except ProbeError as err:
            return Decision(False, str(err))
        scores = {
            "duration": p.duration, "fps": p.fps, "width": p.width, "height": p.height,
            "rotation": p.rotation, "codec": p.codec,
        }
        if not p.fps == p.fps or p.fps <= 0:  # NaN-safe: an unknown rate fails too
            return Decision(False, "unknown frame rate", scores)
        if not p.duration == p.duration or p.duration <= 0:
            return Decision(False, "unknown duration", scores)
        return Decision(True, "ok", scores)


@dataclass
class ResolutionFilter:
    """The shorter displayed side must reach `min_side` pixels (Movie Gen: 720)."""

    min_side: int = 720
    name = "resolution"

    def __call__(self, clip: Clip) -> Decision:
        side = min(clip.probe.display_size)
        if side < self.min_side:
            return Decision(False, f"min side {side} < {self.min_side}", {"min_side": side})
        return Decision(True, "ok", {"min_side": side})


@dataclass
class AspectFilter:
    """Displayed width/height within [min_ratio, max_ratio]; records the orientation."""

    min_ratio: float = 9 / 16
    max_ratio: float = 16 / 9
    name = "aspect"

    def __call__(self, clip: Clip) -> Decision:
        width, height = clip.probe.display_size
        ratio = width / height
        scores = {"aspect": round(ratio, 4), "orientation": _orientation(ratio)}
        if not self.min_ratio - 1e-3 <= ratio <= self.max_ratio + 1e-3:
            allowed = f"[{self.min_ratio:.3f}, {self.max_ratio:.3f}]"
            return Decision(False, f"aspect {ratio:.3f} outside {allowed}", scores)
        return Decision(True, "ok", scores)


def _orientation(ratio: float) -> str:
    return "landscape" if ratio > 1 else "portrait" if ratio < 1 else "square"


@dataclass
class DurationFilter:
    """Usable length in [min_s, max_s] after dropping the source's first `skip_start_s`.

    Openings (logos, titles, fades) are dropped: a window that starts inside the first
    `skip_start_s` seconds of the source is moved past them (Decision.window).
    """

    min_s: float = 4.0
    max_s: float = 16.0
    skip_start_s: float = 1.0
    name = "duration"

    def __call__(self, clip: Clip) -> Decision:
        start, end = max(clip.start_s, self.skip_start_s), clip.end_s
        length = end - start
        scores = {"start_s": round(start, 3), "end_s": round(end, 3)}
        window = (start, end) if start != clip.start_s else None
        if length < self.min_s:
            return Decision(False, f"duration {length:.2f}s < {self.min_s}s", scores)
        if length > self.max_s:
            return Decision(False, f"duration {length:.2f}s > {self.max_s}s", scores)
        return Decision(True, "ok", scores, window)


@dataclass
class CaptionFilter:
    """Caption word count within [min_words, max_words] (Movie Gen captions: ~100 words)."""

    min_words: int = 5
    max_words: int = 300
    name = "caption"

    def __call__(self, clip: Clip) -> Decision:
        words = len(clip.caption.split())
        scores = {"caption_words": words}
        if words == 0:
            return Decision(False, "empty caption", scores)
        if words < self.min_words:
            return Decision(False, f"caption too short: {words} < {self.min_words} words", scores)
        if words > self.max_words:
            return Decision(False, f"caption too long: {words} > {self.max_words} words", scores)
        return Decision(True, "ok", scores)
