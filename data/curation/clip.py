"""A clip under curation: lazy probed metadata and shared low-res luma frames.

Filters never open the file themselves (scene detection aside): they ask the `Clip`,
which probes once and decodes once, so a chain of ten filters costs one decode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import av
import numpy as np


@dataclass(frozen=True)
class Decision:
    """A filter's verdict: `scores` are written to the sample's json.

    `window` (start_s, end_s) narrows the clip for the filters that follow (e.g. the
    duration filter dropping the first seconds of a source video). `split` windows
    make one clip of each for the filters that follow (a source's single shots).
    """

    keep: bool
    reason: str = "ok"
    scores: dict = field(default_factory=dict)
    window: tuple[float, float] | None = None
    split: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Probe:
    """What the container says about its first video stream."""

    duration: float
    fps: float
    width: int
    height: int
    rotation: int  # degrees the player rotates the picture by (phone videos: 90/270)
    codec: str

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: a 90/270 rotation swaps them."""
        if self.rotation % 180:
            return self.height, self.width
        return self.width, self.height


class ProbeError(ValueError):
    """The file cannot be used: not decodable, no video stream, unknown rate."""


def probe_video(path: str | os.PathLike) -> Probe:
    """Open `path` and decode one frame; raise ProbeError with the reason if that fails."""
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            first = next(container.decode(stream), None)
            if first is None:
                raise ProbeError("no decodable frame")
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = float("nan")
            return Probe(
                duration=duration,
                fps=float(rate) if rate else float("nan"),
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                rotation=int(getattr(first, "rotation", 0) or 0) % 360,
                codec=stream.codec_context.name,
            )
    except (av.FFmpegError, OSError, StopIteration) as err:
        raise ProbeError(f"undecodable: {err}") from err


class Clip:
    """One clip (a whole file, or the [start_s, end_s) window of it) with lazy analysis.

    The file is opened only when a filter first asks for `probe` or `luma()`.

    `analysis_fps` and `max_side` set the shared luma frames every pixel filter reads:
    frames are sampled at about `analysis_fps` and scaled so the longer side is at most
    `max_side` (never upscaled). Thresholds of pixel filters depend on both.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        caption: str = "",
        start_s: float = 0.0,
        end_s: float | None = None,
        analysis_fps: float = 4.0,
        max_side: int = 256,
        probe: Probe | None = None,
        key: str | None = None,
    ):
        self.path = os.fspath(path)
        self.key = key if key is not None else self.path  # the sample key in a shard
        self.caption = caption
        self.start_s = start_s
        self._end_s = end_s
        self.analysis_fps = analysis_fps
        self.max_side = max_side
        self._probe = probe
        self._luma: np.ndarray | None = None

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = probe_video(self.path)
        return self._probe

    @property
    def end_s(self) -> float:
        return self.probe.duration if self._end_s is None else self._end_s

    @property
    def duration(self) -> float:
        return self.end_s - self.start_s

    def window(self, start_s: float, end_s: float) -> Clip:
        """The same file narrowed to [start_s, end_s); shares the probe, decodes anew."""
        return Clip(
            self.path, self.caption, start_s, end_s, self.analysis_fps, self.max_side,
            self._probe, self.key,
        )

    def luma(self) -> np.ndarray:
        """uint8 (T, H, W) luma frames of the window, sampled at about `analysis_fps`.

        Frames are turned upright by the probed rotation, so a phone video's text lines
        and letterbox bars lie as the viewer sees them.
        """
        if self._luma is None:
            turns = self.probe.rotation // 90
            self._luma = np.ascontiguousarray(np.rot90(self._decode_luma(), turns, axes=(1, 2)))
        return self._luma

    def _decode_luma(self) -> np.ndarray:
        width, height = self.probe.width, self.probe.height
        scale = min(1.0, self.max_side / max(width, height))
        # Even sizes keep swscale's chroma handling simple; 2 px is the floor.
        out_w, out_h = max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2)
        frames, next_t, step = [], self.start_s, 1.0 / self.analysis_fps
        end = self.end_s
        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                if self.start_s > 0:
                    # Seek lands on the keyframe before start; frames before it are skipped.
                    container.seek(int(self.start_s / stream.time_base), stream=stream)
                for frame in container.decode(stream):
                    t = float(frame.pts * stream.time_base) if frame.pts is not None else next_t
                    if t >= end:
                        break
                    if t + 1e-6 < next_t:
                        continue
                    image = frame.reformat(width=out_w, height=out_h, format="gray")
                    frames.append(image.to_ndarray())
                    next_t += step * max(1, int((t - next_t) / step) + 1)
        except av.FFmpegError as err:
            raise ProbeError(f"undecodable: {err}") from err
        if not frames:
            raise ProbeError("no frames in the clip window")
        return np.stack(frames)
