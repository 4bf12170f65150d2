"""Pixel filters: scene cuts, motion and slideshows, borders, sharpness.

All but scene detection read the clip's shared low-res luma frames (`Clip.luma`), so
their thresholds assume its `analysis_fps` and `max_side`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .clip import Clip, Decision


@dataclass
class SceneCutFilter:
    """PySceneDetect ContentDetector cuts: drops shaky clips (too many cuts per second)
    and splits the rest into their single shots (Movie Gen trains on single-shot clips,
    arXiv 2410.13720 §3.2.1, pre-training data).

    The pieces between cuts that last at least `min_shot_s` are the shots
    (`Decision.split`): each goes through the later filters as a clip of its own. Scores
    hold the cut times and the shots ([start, end] in source seconds). Put the duration
    filter after this one so that its limits, and its skip of the source's first
    seconds, apply to each shot rather than to the whole source.
    """

    threshold: float = 27.0
    min_scene_s: float = 0.5  # no two cuts closer than this (flashes, fast pans)
    max_cuts_per_s: float = 0.5
    min_shot_s: float = 4.0
    name = "scene_cuts"

    def cuts(self, clip: Clip) -> list[float]:
        """Cut times in source seconds within the clip window."""
        # Slow imports; only when used.
        from scenedetect import ContentDetector, FrameTimecode, SceneManager
        from scenedetect.backends.pyav import VideoStreamAv

        # suppress_output: else PySceneDetect hands libav's log back to its default
        # callback, which prints every later decoder message of this process to stderr.
        video = VideoStreamAv(clip.path, suppress_output=True)
        if clip.start_s > 0:
            video.seek(FrameTimecode(clip.start_s, video.frame_rate))
        # A float means seconds to PySceneDetect (an int would mean frames).
        manager = SceneManager()
        manager.add_detector(ContentDetector(self.threshold, min_scene_len=float(self.min_scene_s)))
        manager.detect_scenes(video=video, end_time=FrameTimecode(clip.end_s, video.frame_rate))
        return [round(start.seconds, 3) for start, _ in manager.get_scene_list()[1:]]

    def __call__(self, clip: Clip) -> Decision:
        if clip.duration < self.min_shot_s:  # spares the decode: no shot can be long enough
            return Decision(False, f"no shot of {self.min_shot_s}s: the clip lasts "
                                   f"{clip.duration:.2f}s", {"cuts": [], "shots": []})
        cuts = self.cuts(clip)
        bounds = [clip.start_s, *cuts, clip.end_s]
        shots = [
            [round(a, 3), round(b, 3)]
            for a, b in zip(bounds, bounds[1:], strict=False)
            if b - a >= self.min_shot_s
        ]
        rate = len(cuts) / max(clip.duration, 1e-6)
        scores = {"cuts": cuts, "cuts_per_s": round(rate, 4), "shots": shots}
        if rate > self.max_cuts_per_s:
            return Decision(False, f"too many cuts: {rate:.2f}/s > {self.max_cuts_per_s}/s", scores)
        if not shots:
            return Decision(False, f"no shot of {self.min_shot_s}s between the cuts", scores)
        return Decision(True, "ok", scores, split=tuple((a, b) for a, b in shots))


@dataclass
class MotionFilter:
    """VMAF-style motion: mean |difference| of blurred consecutive luma frames (0-255).

    Frames are scaled to `width` px wide and Gaussian-blurred first, as VMAF's motion
    feature does, so that noise and compression grain do not count as motion. Static
    clips (< min_motion) and violent ones (> max_motion) are dropped, and so are
    slideshows: a run of near-identical frames (diff < still_eps) lasting
    max_still_run_s or more.
    """

    min_motion: float = 0.5
    max_motion: float = 40.0
    still_eps: float = 0.1
    max_still_run_s: float = 2.0
    width: int = 64
    blur_sigma: float = 1.0
    name = "motion"

    def diffs(self, clip: Clip) -> np.ndarray:
        """Per consecutive pair of analysis frames, the mean absolute blurred difference."""
        luma = clip.luma()
        height = max(1, round(luma.shape[1] * self.width / luma.shape[2]))
        small = [cv2.resize(f, (self.width, height), interpolation=cv2.INTER_AREA) for f in luma]
        blurred = np.stack(
            [cv2.GaussianBlur(f.astype(np.float32), (0, 0), self.blur_sigma) for f in small]
        )
        return np.abs(np.diff(blurred, axis=0)).mean(axis=(1, 2))

    def __call__(self, clip: Clip) -> Decision:
        d = self.diffs(clip)
        if d.size == 0:
            return Decision(False, "single frame: motion unknown", {"motion": 0.0})
        motion = float(d.mean())
        still_run_s = _longest_run(d < self.still_eps) / clip.analysis_fps
        scores = {"motion": round(motion, 4), "still_run_s": round(still_run_s, 3)}
        if motion < self.min_motion:
            return Decision(False, f"static: motion {motion:.3f} < {self.min_motion}", scores)
        if still_run_s >= self.max_still_run_s:
            return Decision(
                False, f"slideshow: still for {still_run_s:.2f}s >= {self.max_still_run_s}s",
                scores,
            )
        if motion > self.max_motion:
            return Decision(False, f"violent: motion {motion:.2f} > {self.max_motion}", scores)
        return Decision(True, "ok", scores)


def _longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


@dataclass
class BorderFilter:
    """Letterbox/pillarbox bars: rows/columns that stay dark in every analysed frame.

    A row (column) is a bar when its mean over the per-pixel temporal maximum is at most
    `black_level`; bars are counted from each edge inward. Dropped when the bars cover
    more than `max_fraction` of the picture.
    """

    black_level: float = 24.0
    max_fraction: float = 0.15
    name = "borders"

    def __call__(self, clip: Clip) -> Decision:
        peak = clip.luma().max(axis=0).astype(np.float32)
        dark_rows = peak.mean(axis=1) <= self.black_level
        dark_cols = peak.mean(axis=0) <= self.black_level
        top, bottom = _edge_run(dark_rows), _edge_run(dark_rows[::-1])
        left, right = _edge_run(dark_cols), _edge_run(dark_cols[::-1])
        height, width = peak.shape
        content = max(0, height - top - bottom) * max(0, width - left - right)
        fraction = 1.0 - content / (height * width)
        scores = {
            "border_fraction": round(fraction, 4),
            "borders_tblr": [round(v / n, 4) for v, n in
                             ((top, height), (bottom, height), (left, width), (right, width))],
        }
        if fraction > self.max_fraction:
            return Decision(False, f"borders cover {fraction:.2f} > {self.max_fraction}", scores)
        return Decision(True, "ok", scores)


def _edge_run(flags: np.ndarray) -> int:
    """How many leading entries are True."""
    false = np.flatnonzero(~flags)
    return int(false[0]) if false.size else len(flags)


@dataclass
class SharpnessFilter:
    """Variance of the Laplacian, averaged over `num_frames` evenly spaced frames.

    Kept in [min_var, max_var]: low is blur or out of focus, very high is noise or
    grain. The value depends on resolution (`Clip.max_side`); tune on your data.
    """

    min_var: float = 200.0
    max_var: float = 2000.0
    num_frames: int = 3
    name = "sharpness"

    def __call__(self, clip: Clip) -> Decision:
        luma = clip.luma()
        picks = np.linspace(0, len(luma) - 1, min(self.num_frames, len(luma))).round()
        var = float(np.mean([cv2.Laplacian(luma[int(i)], cv2.CV_64F).var() for i in picks]))
        scores = {"sharpness": round(var, 2)}
        if var < self.min_var:
            return Decision(False, f"blurry: sharpness {var:.1f} < {self.min_var}", scores)
        if var > self.max_var:
            return Decision(False, f"noisy: sharpness {var:.1f} > {self.max_var}", scores)
        return Decision(True, "ok", scores)
