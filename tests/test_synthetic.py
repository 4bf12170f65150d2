"""The synthetic text-video set: determinism, geometry and captions."""

import pytest
import torch

from data.synthetic import (
    COLOURS,
    DIRECTIONS,
    SHAPE_FRACTION,
    SHAPES,
    SPEEDS,
    ClipSpec,
    SyntheticVideos,
)

ARGS = dict(num_samples=200, frames=8, height=32, width=48, fps=8.0, seed=0)


def make(**overrides) -> SyntheticVideos:
    return SyntheticVideos(**{**ARGS, **overrides})


def foreground(video: torch.Tensor) -> torch.Tensor:
    """(T, H, W) bool: pixels brighter than the black background."""
    return video.max(dim=0).values > -0.5


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """(y, x) mean of the True pixels of an (H, W) mask."""
    return torch.nonzero(mask).float().mean(dim=0)


def test_item_shapes_dtype_range():
    item = make()[3]
    video = item["video"]
    assert video.shape == (3, 8, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert item["fps"] == 8.0 and isinstance(item["caption"], str)
    corner = video[:, :, 0, 0]
    assert torch.equal(corner, torch.full_like(corner, -1.0))  # black background
    assert len(make()) == 200


def test_deterministic():
    a, b = make(), make()
    for i in range(20):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"])
        assert x["caption"] == y["caption"] and x["key"] == y["key"]


def test_seed_and_split_change_the_stream():
    base = [make().spec(i) for i in range(50)]
    assert base != [make(seed=1).spec(i) for i in range(50)]
    assert base != [make(split="val").spec(i) for i in range(50)]


def test_keys_unique_and_stable():
    keys = [make()[i]["key"] for i in range(200)]
    assert len(set(keys)) == 200
    assert keys[7] == "synthetic-s0-8x32x48/train/00000007"
    assert make(split="val")[7]["key"] != keys[7]
    assert make(seed=1)[7]["key"] != keys[7]


def test_vocabulary_is_covered():
    specs = [make().spec(i) for i in range(200)]
    assert {s.colour for s in specs} == set(COLOURS)
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.direction for s in specs} == set(DIRECTIONS)
    assert {s.speed for s in specs} == set(SPEEDS)


def test_caption_names_the_spec():
    ds = make()
    for i in range(50):
        spec, words = ds.spec(i), ds[i]["caption"].split()
        for word in (spec.colour, spec.shape, spec.direction, spec.speed):
            assert word in words
    assert (
        ClipSpec("red", "square", "left", "slowly", 5, 5).caption
        == "a red square moving left slowly"
    )


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("speed", list(SPEEDS))
def test_shape_moves_in_stated_direction(direction, speed):
    ds = make()
    specs = [(i, ds.spec(i)) for i in range(200)]
    picked = [i for i, s in specs if s.direction == direction and s.speed == speed]
    assert len(picked) >= 3
    dy, dx = DIRECTIONS[direction]
    expected = SPEEDS[speed] * ds.width * (ds.frames - 1)
    for i in picked:
        mask = foreground(ds[i]["video"])
        moved = centroid(mask[-1]) - centroid(mask[0])
        along = moved[0] * dy + moved[1] * dx
        across = moved[0] * dx + moved[1] * dy
        assert along == pytest.approx(expected, abs=1.0), (i, ds.spec(i))
        assert abs(across) < 1.0


def test_shape_stays_inside_frame():
    # 17 frames at 32x32 leave the quickest shapes ~1 px of spare room.
    ds = make(frames=17, height=32, width=32)
    half = SHAPE_FRACTION * 32 / 2
    for i in range(len(ds)):
        spec = ds.spec(i)
        dy, dx = DIRECTIONS[spec.direction]
        step = torch.arange(ds.frames) * SPEEDS[spec.speed] * ds.width
        for centre, d, extent in ((spec.y0, dy, ds.height), (spec.x0, dx, ds.width)):
            path = centre + d * step
            assert path.min() - half >= -1e-4 and path.max() + half <= extent + 1e-4, spec
        # Pixel counts agree across frames, so no frame has the shape cut off.
        per_frame = foreground(ds[i]["video"]).sum(dim=(1, 2))
        assert per_frame.min() > 0.75 * per_frame.max(), (spec, per_frame)


def test_index_errors():
    ds = make(num_samples=5)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-1]
    with pytest.raises(IndexError):
        ds.spec(5)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="'test'"):
        make(split="test")


def test_impossible_geometry_raises():
    with pytest.raises(ValueError, match="40 frames"):
        make(frames=40)
    with pytest.raises(ValueError, match="4x48"):
        make(height=4)


def test_bad_spec_raises():
    with pytest.raises(ValueError, match="'purple'"):
        ClipSpec("purple", "square", "left", "slowly", 5, 5)
