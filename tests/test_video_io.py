"""Round trips of real mp4 files through data.video, and its errors on bad input."""

import numpy as np
import pytest
import torch

from data.video import read_video, uint8_to_video, video_to_uint8, write_video


def moving_gradient(frames: int = 8, height: int = 32, width: int = 48) -> torch.Tensor:
    """uint8 (T, H, W, 3): smooth ramps that shift by 4 px per frame."""
    t = torch.arange(frames).view(frames, 1, 1)
    y = torch.arange(height).view(1, height, 1)
    x = torch.arange(width).view(1, 1, width)
    r = (x + 4 * t) * 255 / (width + 4 * frames)
    g = y * 255 / height
    b = torch.full_like(r, 128.0)
    return torch.stack(torch.broadcast_tensors(r, g, b), dim=-1).round().to(torch.uint8)


@pytest.mark.parametrize("fps", [24.0, 12.5, 30000 / 1001])
def test_round_trip(tmp_path, fps):
    frames = moving_gradient()
    path = tmp_path / "nested" / "dir" / "clip.mp4"
    write_video(path, frames, fps=fps)
    decoded, decoded_fps = read_video(path)
    assert decoded.dtype == torch.uint8
    assert decoded.shape == frames.shape
    assert decoded_fps == pytest.approx(fps, rel=1e-6)
    # Measured ~2.5 at crf 18 (yuv420p halves chroma resolution); a real bug is far above 4.
    assert (decoded.int() - frames.int()).abs().float().mean() < 4
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no .tmp left


def test_numpy_input_and_str_path(tmp_path):
    frames = moving_gradient(frames=3).numpy()
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames, fps=8)
    decoded, _ = read_video(path)
    assert decoded.shape == frames.shape


def test_overwrite_replaces_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, moving_gradient(frames=8), fps=8)
    write_video(path, moving_gradient(frames=3), fps=8)
    assert read_video(path)[0].shape[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_odd_size_raises(tmp_path):
    with pytest.raises(ValueError, match="even") as err:
        write_video(tmp_path / "odd.mp4", moving_gradient(height=31), fps=8)
    assert "(8, 31, 48, 3)" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((2, 8, 8), np.uint8),
        np.zeros((0, 8, 8, 3), np.uint8),
    ],
)
def test_bad_frames_raise(tmp_path, frames):
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "bad.mp4", frames, fps=8)


def test_failed_encode_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - PyAV's error type for an unknown codec varies
        write_video(tmp_path / "x.mp4", moving_gradient(), fps=8, codec="no-such-codec")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_raises(tmp_path):
    path = tmp_path / "absent.mp4"
    with pytest.raises(FileNotFoundError, match="absent.mp4"):
        read_video(path)


@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).bytes(4096)])
def test_corrupt_file_raises(tmp_path, content):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        read_video(path)


def test_truncated_file_raises(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, moving_gradient(), fps=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="clip.mp4"):
        read_video(path)


def test_uint8_video_conversions():
    frames = torch.randint(0, 256, (3, 4, 6, 3), dtype=torch.uint8)
    video = uint8_to_video(frames)
    assert video.shape == (3, 3, 4, 6) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(video_to_uint8(video), frames)
    assert torch.equal(uint8_to_video(frames.numpy()), video)


def test_video_to_uint8_clamps_and_rounds():
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(3, 1, 1, 5)
    frames = video_to_uint8(video)
    assert frames.shape == (1, 1, 5, 3)
    assert frames[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even
