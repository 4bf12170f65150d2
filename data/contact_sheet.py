"""Contact sheets: many short videos as one picture a person can read at a glance.

One row per video, its prompt written at the left, its frames left to right, each frame
scaled up by an integer factor with nearest-neighbour (no blur hides what a model drew).
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data.video import video_to_uint8

GAP = 2          # pixels between frames and rows
LABEL_WIDTH = 200
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)


def sheet_size(count: int, frames: int, height: int, width: int,
               scale: int) -> tuple[int, int]:
    """(height, width) in pixels of the sheet of ``count`` videos of (frames, height, width)."""
    row = height * scale
    return (count * (row + GAP) + GAP,
            LABEL_WIDTH + frames * (width * scale + GAP) + GAP)


def contact_sheet(videos: torch.Tensor | list[torch.Tensor], prompts: list[str],
                  scale: int = 3) -> Image.Image:
    """Videos (B, 3, T, H, W) in [-1, 1] (or a list of (3, T, H, W) of one shape) and
    their prompts -> an RGB picture of ``sheet_size`` pixels."""
    if len(videos) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per video and at least one video; got "
                         f"{len(videos)} videos and {len(prompts)} prompts")
    if scale < 1:
        raise ValueError(f"scale={scale} must be >= 1")
    _, frames, height, width = videos[0].shape
    sheet_h, sheet_w = sheet_size(len(prompts), frames, height, width, scale)
    sheet = Image.new("RGB", (sheet_w, sheet_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    row_h = height * scale
    for row, (video, prompt) in enumerate(zip(videos, prompts, strict=True)):
        if tuple(video.shape) != (3, frames, height, width):
            raise ValueError(f"video {row} has shape {tuple(video.shape)}, the first "
                             f"{(3, frames, height, width)}; a sheet holds one shape")
        top = GAP + row * (row_h + GAP)
        lines = textwrap.wrap(prompt or '""', width=30)
        draw.multiline_text((GAP + 2, top + 2), "\n".join(lines), fill=TEXT, font=font)
        pixels = video_to_uint8(video.float().cpu()).numpy()  # (T, H, W, 3)
        pixels = np.repeat(np.repeat(pixels, scale, axis=1), scale, axis=2)
        for index, frame in enumerate(pixels):
            left = LABEL_WIDTH + GAP + index * (width * scale + GAP)
            sheet.paste(Image.fromarray(frame), (left, top))
    return sheet


def write_contact_sheet(path: str | os.PathLike, videos: torch.Tensor | list[torch.Tensor],
                        prompts: list[str], scale: int = 3) -> str:
    """Write ``contact_sheet`` as a PNG at ``path`` (parents created); the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    contact_sheet(videos, prompts, scale).save(path, format="PNG")
    return path
