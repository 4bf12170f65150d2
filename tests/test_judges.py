"""The judges of the synthetic set (data.judges) on real clips after an mp4 round trip,
on videos that show no object, and the contact sheet (data.contact_sheet)."""

from collections import Counter

import numpy as np
import pytest
import torch

from data.contact_sheet import contact_sheet, sheet_size
from data.judges import (
    ATTRIBUTES,
    NONE,
    Judgement,
    caption_judgement,
    colour_in_caption,
    dominant_colour,
    judge_video,
    match_rates,
)
from data.synthetic import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    ClipSpec,
    SyntheticVideos,
    render_clip,
)
from data.video import read_video, uint8_to_video, video_to_uint8, write_video


def round_trip(video: torch.Tensor, path) -> torch.Tensor:
    write_video(path, video_to_uint8(video), fps=8.0)
    return uint8_to_video(read_video(path)[0])


@pytest.mark.parametrize("frames,height,width", [(8, 32, 48), (16, 32, 32)])
def test_judges_agree_with_captions_after_mp4(tmp_path, frames, height, width):
    """Every split, colour, shape, direction and speed: >= 98% agreement per judge."""
    hits, seen = Counter(), {attribute: set() for attribute in ATTRIBUTES}
    clips = 0
    for split in ("train", "val"):
        data = SyntheticVideos(60, frames, height, width, 8.0, seed=3, split=split)
        for i in range(len(data)):
            item = data[i]
            asked = caption_judgement(item["caption"])
            judged = judge_video(round_trip(item["video"], tmp_path / f"{split}{i}.mp4"))
            clips += 1
            for attribute in ATTRIBUTES:
                seen[attribute].add(getattr(asked, attribute))
                hits[attribute] += getattr(judged, attribute) == getattr(asked, attribute)
    assert seen == {"colour": set(COLOURS), "shape": set(SHAPES),
                    "direction": set(DIRECTIONS), "speed": set(SPEEDS)}
    for attribute in ATTRIBUTES:
        assert hits[attribute] / clips >= 0.98, (attribute, hits[attribute], clips)


def test_noise_and_speckle_are_no_shape_and_no_motion():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((3, 8, 32, 32), generator=generator) * 2 - 1
    # scattered red 2x2 blocks on black: the failure a person calls speckle
    blocks = torch.rand((8, 16, 16), generator=generator) < 0.15
    speckle = torch.full((3, 8, 32, 32), -1.0)
    speckle[0] = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2).float() * 1.8 - 1
    for video in (noise, speckle):
        judged = judge_video(video)
        assert (judged.shape, judged.direction, judged.speed) == (NONE, NONE, NONE)
    assert dominant_colour(speckle) == "red"  # the colour judge alone would be fooled


def test_black_and_still_videos():
    assert judge_video(torch.full((3, 8, 32, 32), -1.0)) == Judgement(NONE, NONE, NONE, NONE)
    still = render_clip(ClipSpec("cyan", "circle", "left", "slowly", 16, 16), 1, 32, 32)
    judged = judge_video(still.expand(3, 8, 32, 32))
    assert (judged.colour, judged.shape, judged.direction) == ("cyan", "circle", NONE)


def test_two_objects_are_no_shape():
    video = render_clip(ClipSpec("red", "square", "right", "slowly", 8, 8), 8, 32, 32)
    other = render_clip(ClipSpec("red", "square", "left", "slowly", 24, 24), 8, 32, 32)
    assert judge_video(torch.maximum(video, other)).shape == NONE


def test_caption_judgement_and_match_rates():
    assert caption_judgement("a red square moving left slowly") == Judgement(
        "red", "square", "left", "slowly")
    assert caption_judgement("a blob") == Judgement(NONE, NONE, NONE, NONE)
    with pytest.raises(ValueError, match="several shapes"):
        caption_judgement("a square circle")
    good = render_clip(ClipSpec("blue", "triangle", "down", "quickly", 8, 16), 8, 32, 32)
    rates = match_rates([good, good], ["a blue triangle moving down quickly",
                                       "a red triangle moving up quickly"])
    assert rates == {"colour": 0.5, "shape": 1.0, "direction": 0.5, "speed": 1.0}
    assert match_rates([good], ["a blue thing"]) == {"colour": 1.0}


def test_contact_sheet_grid():
    videos = torch.rand(3, 3, 5, 16, 24) * 2 - 1
    sheet = contact_sheet(videos, ["a", "b", "c"], scale=2)
    assert sheet.size[::-1] == sheet_size(3, 5, 16, 24, 2)
    # the first frame of the second row lands where the layout says
    pixels = torch.from_numpy(np.array(sheet))
    expected = video_to_uint8(videos[1])[0]
    top, left = sheet_size(1, 5, 16, 24, 2)[0], sheet_size(1, 0, 16, 24, 2)[1]
    assert torch.equal(pixels[top: top + 32: 2, left: left + 48: 2], expected)
    with pytest.raises(ValueError, match="one prompt per video"):
        contact_sheet(videos, ["a"])
def test_dominant_colour_on_renders():
    ds = SyntheticVideos(100, 8, 32, 48, 8.0, seed=0)
    for i in range(100):
        item = ds[i]
        assert dominant_colour(item["video"]) == colour_in_caption(item["caption"])


def test_dominant_colour_after_mp4_round_trip(tmp_path):
    ds = SyntheticVideos(12, 8, 32, 48, 8.0, seed=0)
    for i in range(12):
        item = ds[i]
        path = tmp_path / f"{i}.mp4"
        write_video(path, video_to_uint8(item["video"]), fps=item["fps"])
        decoded = uint8_to_video(read_video(path)[0])
        assert dominant_colour(decoded) == ds.spec(i).colour


def test_dominant_colour_background_and_haze():
    black = torch.full((3, 2, 8, 8), -1.0)
    assert dominant_colour(black) == "none"
    grey = torch.full((3, 2, 8, 8), 0.3)  # bright but colourless: no vote
    assert dominant_colour(grey) == "none"
    video = grey.clone()
    video[:, :, :2, :2] = torch.tensor([30, 30, 230]).view(3, 1, 1, 1) / 127.5 - 1
    assert dominant_colour(video) == "blue"


def test_dominant_colour_majority_beats_outliers():
    video = torch.full((3, 1, 10, 10), -1.0)
    video[:, :, :6] = torch.tensor([230, 230, 30]).view(3, 1, 1, 1) / 127.5 - 1
    video[:, :, 6:] = torch.tensor([230, 30, 30]).view(3, 1, 1, 1) / 127.5 - 1
    assert dominant_colour(video) == "yellow"


def test_colour_in_caption():
    assert colour_in_caption("A Cyan circle moving up quickly") == "cyan"
    assert colour_in_caption("a reddish blob") is None
    assert colour_in_caption("") is None
    with pytest.raises(ValueError, match="several"):
        colour_in_caption("a red and blue square")
