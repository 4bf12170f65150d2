"""A deterministic synthetic text-video set: one coloured shape moving on black.

Captions name colour, shape, direction and speed ("a red square moving left slowly"),
so a tiny DiT trained on CPU can learn to follow a prompt; ``data.judges`` measures
how well it does.
"""

from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

# Saturated and far apart in RGB, so a nearest-colour vote survives lossy codecs.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 230, 30),
    "blue": (30, 30, 230),
    "yellow": (230, 230, 30),
    "magenta": (230, 30, 230),
    "cyan": (30, 230, 230),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# (dy, dx) in image coordinates: y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
# Pixels per frame as a fraction of frame width. 2/48 lets a 17-frame clip travel
# ~2/3 of the frame, which is as far as a 0.3-wide shape can go and stay inside.
SPEEDS: dict[str, float] = {"slowly": 1 / 48, "quickly": 2 / 48}
# Shape extent (side, diameter, triangle base and height) as a fraction of min(H, W).
SHAPE_FRACTION = 0.3
SPLITS = ("train", "val")



@dataclass(frozen=True)
class ClipSpec:
    """What one clip shows; (y0, x0) is the shape's centre in pixels at frame 0."""

    colour: str
    shape: str
    direction: str
    speed: str
    y0: float
    x0: float

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, tuple(COLOURS)),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, tuple(DIRECTIONS)),
            ("speed", self.speed, tuple(SPEEDS)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; allowed: {allowed}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed}"


def _geometry(height: int, width: int) -> tuple[float, dict[str, float]]:
    """Shape extent in pixels and pixels per frame for each speed name."""
    size = SHAPE_FRACTION * min(height, width)
    return size, {name: fraction * width for name, fraction in SPEEDS.items()}


def render_clip(spec: ClipSpec, frames: int, height: int, width: int) -> torch.Tensor:
    """Render `spec` to a float32 video (3, T, H, W) in [-1, 1] on a black background."""
    size, pixels_per_frame = _geometry(height, width)
    dy, dx = DIRECTIONS[spec.direction]
    step = torch.arange(frames, dtype=torch.float32) * pixels_per_frame[spec.speed]
    cy = (spec.y0 + dy * step).view(frames, 1, 1)
    cx = (spec.x0 + dx * step).view(frames, 1, 1)
    # Offsets of pixel centres from the shape centre, broadcast to (T, H, W).
    y = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5 - cy
    x = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5 - cx
    half = size / 2
    if spec.shape == "square":
        mask = (y.abs() <= half) & (x.abs() <= half)
    elif spec.shape == "circle":
        mask = y**2 + x**2 <= half**2
    else:  # triangle, apex up: half-width grows from 0 at the apex to `half` at the base
        mask = (y.abs() <= half) & (x.abs() <= (y + half) / 2)
    rgb = torch.tensor(COLOURS[spec.colour], dtype=torch.float32) / 127.5 - 1
    return torch.where(mask.unsqueeze(0), rgb.view(3, 1, 1, 1), torch.tensor(-1.0))


class SyntheticVideos(Dataset):
    """`num_samples` clips; sample i is a pure function of (seed, split, i).

    Items: {"video": float32 (3, T, H, W) in [-1, 1], "caption": str, "fps": float,
    "key": str}. Keys carry seed and geometry, because the pixels depend on them and a
    cache keyed on `key` must never mix clips from two different configurations.
    """

    def __init__(
        self,
        num_samples: int,
        frames: int,
        height: int,
        width: int,
        fps: float,
        seed: int,
        split: str = "train",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
        if num_samples < 0 or frames < 1 or not fps > 0:
            raise ValueError(
                f"need num_samples >= 0, frames >= 1, fps > 0; got num_samples={num_samples}, "
                f"frames={frames}, fps={fps}"
            )
        size, pixels_per_frame = _geometry(height, width)
        if size < 2:
            raise ValueError(
                f"frames of {height}x{width} give a shape of {size:.1f} px; "
                f"need min(H, W) >= {2 / SHAPE_FRACTION:.1f} for a shape of >= 2 px"
            )
        travel = max(pixels_per_frame.values()) * (frames - 1)
        room = min(height, width) - size
        if travel > room:
            raise ValueError(
                f"a shape of {size:.1f} px moving {travel:.1f} px over {frames} frames "
                f"(quickest speed {max(pixels_per_frame.values()):.2f} px/frame) "
                f"cannot stay inside {height}x{width}: only {room:.1f} px of room; "
                f"use fewer frames or a larger frame"
            )
        self.num_samples, self.frames, self.height, self.width = num_samples, frames, height, width
        self.fps, self.seed, self.split = float(fps), seed, split

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return i

    def spec(self, i: int) -> ClipSpec:
        """The clip spec of sample i, drawn from an RNG seeded by (seed, split, i)."""
        i = self._index(i)
        # blake2b, not hash(): Python salts str hashes per process.
        digest = hashlib.blake2b(f"{self.seed}/{self.split}/{i}".encode(), digest_size=8)
        rng = random.Random(int.from_bytes(digest.digest(), "little"))
        colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        direction, speed = rng.choice(tuple(DIRECTIONS)), rng.choice(tuple(SPEEDS))
        size, pixels_per_frame = _geometry(self.height, self.width)
        travel = pixels_per_frame[speed] * (self.frames - 1)
        dy, dx = DIRECTIONS[direction]
        # Start range per axis: the shape's box must stay inside the frame at frame 0
        # and after moving `travel` pixels along (dy, dx).
        y0 = rng.uniform(*_start_range(self.height, size, dy * travel))
        x0 = rng.uniform(*_start_range(self.width, size, dx * travel))
        return ClipSpec(colour, shape, direction, speed, y0, x0)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        spec = self.spec(i)
        return {
            "video": render_clip(spec, self.frames, self.height, self.width),
            "caption": spec.caption,
            "fps": self.fps,
            "key": f"synthetic-s{self.seed}-{self.frames}x{self.height}x{self.width}"
            f"/{self.split}/{i:08d}",
        }


def _start_range(extent: int, size: float, shift: float) -> tuple[float, float]:
    """Bounds on a start centre along one axis so [c - size/2, c + size/2] and its
    shifted copy both stay inside [0, extent]."""
    half = size / 2
    return half + max(0.0, -shift), extent - half - max(0.0, shift)
