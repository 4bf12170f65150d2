"""Video file I/O with PyAV, and conversion between uint8 frames and model tensors.

Two layouts meet here:
- frames: uint8 (T, H, W, 3), RGB, as files store them;
- video:  float32 (C, T, H, W) in [-1, 1], as models consume them.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction

import av
import av.logging
import numpy as np
import torch

# libav's log levels by name; "off" drops its messages inside libav (PyAV's default).
LIBAV_LOG_LEVELS = {"off": None, "panic": av.logging.PANIC, "fatal": av.logging.FATAL,
                    "error": av.logging.ERROR, "warning": av.logging.WARNING,
                    "info": av.logging.INFO, "verbose": av.logging.VERBOSE,
                    "debug": av.logging.DEBUG}


def route_libav_logs(level: str) -> None:
    """libav's own messages ("moov atom not found", "error while decoding MB ...") from
    `level` (a LIBAV_LOG_LEVELS name) up go to Python logging, under the `libav.<component>`
    loggers; "off" drops them. The decoders' errors reach callers as exceptions either
    way: on a large corpus these lines are noise, one per bad file, on stderr."""
    threshold = LIBAV_LOG_LEVELS[level]
    av.logging.set_level(threshold)
    if threshold is not None:  # PyAV's own default lets only warnings through
        logging.getLogger("libav").setLevel(av.logging.adapt_level(threshold))


# Every codec PyAV ships (libx264, libx265, mpeg4, libvpx-vp9, libsvtav1) accepts
# yuv420p, and players expect it; its 2x2 chroma subsampling is why H and W must be even.
_PIX_FMT = "yuv420p"


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) to an mp4 at `path`.

    The file appears atomically: it is encoded to `path + ".tmp"` and renamed, so a
    concurrent reader sees either no file or a complete one.
    """
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"write_video expects uint8 frames of shape (T, H, W, 3), "
            f"got dtype {array.dtype} shape {tuple(array.shape)}"
        )
    num_frames, height, width, _ = array.shape
    if num_frames == 0:
        raise ValueError(f"write_video got no frames (shape {tuple(array.shape)})")
    if height % 2 or width % 2:
        raise ValueError(
            f"{_PIX_FMT} needs even height and width, got frames of shape "
            f"{tuple(array.shape)}; crop or pad H and W to even sizes"
        )
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    # The ".tmp" suffix hides the container type from PyAV, hence format="mp4".
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, _PIX_FMT
            stream.options = {"crf": str(crf)}
            for frame in array:
                packets = stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
                container.mux(packets)
            container.mux(stream.encode())  # flush frames the encoder still holds
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """Decode the first video stream of `path` to (frames uint8 (T, H, W, 3), fps)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.FFmpegError, ValueError) as err:
        raise ValueError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise ValueError(f"cannot decode video {path}: it holds no frames")
    if not rate:
        raise ValueError(f"cannot decode video {path}: its frame rate is unknown")
    return torch.from_numpy(np.stack(frames)), float(rate)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) float in [-1, 1] -> (T, H, W, C) uint8; out-of-range values clamp."""
    if video.ndim != 4:
        raise ValueError(f"expected a (C, T, H, W) video, got shape {tuple(video.shape)}")
    scaled = (video.detach().float().clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def uint8_to_video(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, H, W) float32 in [-1, 1]; inverse of video_to_uint8."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(
            f"expected uint8 (T, H, W, C) frames, got dtype {frames.dtype} "
            f"shape {tuple(frames.shape)}"
        )
    # numpy casts uint8 to float32 ~2x faster than torch's single-threaded kernel, and its
    # C-order cast reorders in the same pass: at 768 px this was a loader worker's main cost.
    video = frames.cpu().numpy().transpose(3, 0, 1, 2).astype(np.float32, order="C")
    video /= np.float32(127.5)
    video -= np.float32(1.0)
    return torch.from_numpy(video)
