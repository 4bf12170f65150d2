"""Curation filters on real tiny clips encoded with PyAV (libx264, 96x64, 8 fps, 5 s)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from data.curation import (
    AspectFilter,
    BorderFilter,
    CaptionFilter,
    Clip,
    ConceptBalancer,
    DuplicateFilter,
    DuplicateIndex,
    DurationFilter,
    MotionFilter,
    ProbeFilter,
    ResolutionFilter,
    SceneCutFilter,
    ScoreFilter,
    SharpnessFilter,
    TextAreaHeuristic,
    build_filters,
    clip_signature,
    run_filters,
)
from data.video import write_video

ROOT = Path(__file__).resolve().parents[1]
H, W, FPS, SECONDS = 64, 96, 8, 5
N = FPS * SECONDS


def _texture(seed: int, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth random grey texture: noise on a coarse grid, upsampled (cell px per knot)."""
    rng = np.random.default_rng(seed)
    knots = rng.integers(0, 256, (h // cell, w // cell), dtype=np.uint8)
    return cv2.resize(knots, (w, h), interpolation=cv2.INTER_CUBIC)


def _pan(seed: int, frames: int = N, h: int = H, w: int = W, cell: int = 8, dx: int = 1):
    """RGB frames of a texture panning `dx` px per frame."""
    strip = _texture(seed, h, w + frames * dx + cell, cell)
    grey = np.stack([strip[:, i * dx:i * dx + w] for i in range(frames)])
    return np.repeat(grey[..., None], 3, axis=3)


def _tint(frames: np.ndarray, channel: int) -> np.ndarray:
    out = frames.copy()
    out[..., channel] //= 3
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("curation")
    moving = _pan(1)
    stills = np.concatenate([np.repeat(_pan(s, 1), N // 2, axis=0) for s in (4, 5)])
    letterbox = moving.copy()
    letterbox[:, :12] = letterbox[:, -12:] = 0
    text = _pan(1, cell=16)
    for y, line in ((34, "HELLO WORLD"), (54, "SUBTITLE 2")):
        for frame in text:
            cv2.putText(frame, line, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255,) * 3, 1)
    shifted = _pan(1, N + 2)[2:]  # the same pan 2 px further on, re-encoded coarsely
    half = N // 2
    videos = {
        "moving": moving,
        "static": np.repeat(moving[:1], N, axis=0),
        "slideshow": stills,
        # A new scene every frame: strobe-like, far beyond camera motion.
        "violent": np.concatenate([_pan(100 + i, 1, cell=16) for i in range(N)]),
        "noise": np.random.default_rng(0).integers(0, 256, (N, H, W, 3), dtype=np.uint8),
        "two_scenes": np.concatenate([_tint(_pan(1, half), 2), _tint(_pan(2, half), 0)]),
        "many_cuts": np.concatenate([_tint(_pan(s, FPS), s % 3) for s in range(SECONDS)]),
        "letterbox": letterbox,
        "sharp": _pan(1, cell=4),
        "blurry": np.stack([cv2.GaussianBlur(f, (0, 0), 2) for f in _pan(1, cell=4)]),
        "text": text,
        "clean": _pan(1, cell=16),
        "shifted": shifted,
        "other": _pan(3),
        "portrait": _pan(1, h=W, w=H),
        "wide": _pan(1, h=32, w=96),
    }
    paths = {}
    for name, frames in videos.items():
        paths[name] = str(root / f"{name}.mp4")
        write_video(paths[name], frames, FPS, crf=30 if name == "shifted" else 18)
    paths["corrupt"] = str(root / "corrupt.mp4")
    Path(paths["corrupt"]).write_bytes(np.random.default_rng(0).bytes(4096))
    return paths


def test_probe_reads_metadata_and_rejects_garbage(clips):
    ok = ProbeFilter()(Clip(clips["moving"]))
    assert ok.keep and ok.reason == "ok"
    assert (ok.scores["width"], ok.scores["height"], ok.scores["rotation"]) == (W, H, 0)
    assert ok.scores["fps"] == pytest.approx(FPS)
    assert ok.scores["duration"] == pytest.approx(SECONDS, abs=0.2)
    bad = ProbeFilter()(Clip(clips["corrupt"]))
    assert not bad.keep and bad.reason.startswith("undecodable")
    [chain] = run_filters(Clip(clips["corrupt"]), [MotionFilter()])  # no probe filter first
    assert (chain.keep, chain.dropped_by) == (False, "motion")
    assert chain.reason.startswith("undecodable")


def test_aspect_and_resolution(clips):
    portrait = AspectFilter()(Clip(clips["portrait"]))
    landscape = AspectFilter()(Clip(clips["moving"]))
    assert portrait.keep and portrait.scores["orientation"] == "portrait"
    assert landscape.keep and landscape.scores["orientation"] == "landscape"
    wide = AspectFilter()(Clip(clips["wide"]))
    assert not wide.keep and wide.reason == "aspect 3.000 outside [0.562, 1.778]"
    assert not AspectFilter(min_ratio=1.0)(Clip(clips["portrait"])).keep
    low = ResolutionFilter()(Clip(clips["moving"]))
    assert not low.keep and low.reason == "min side 64 < 720"
    assert ResolutionFilter(min_side=64)(Clip(clips["moving"])).keep


def test_duration_skips_the_start_and_bounds_length(clips):
    clip = Clip(clips["moving"])
    kept = DurationFilter()(clip)  # default: drop the first second, 4 s remain
    assert kept.keep and kept.window == (1.0, pytest.approx(SECONDS, abs=0.2))
    window = clip.window(*kept.window)
    assert window.duration == pytest.approx(4.0, abs=0.2)
    assert len(window.luma()) == 4 * window.analysis_fps  # frames from 1 s on, at 4 fps
    short = DurationFilter(skip_start_s=2.0)(clip)
    assert not short.keep and short.reason.startswith("duration 3.0") and "< 4.0s" in short.reason
    long = DurationFilter(min_s=1.0, max_s=3.0, skip_start_s=0.0)(clip)
    assert not long.keep and long.reason.endswith("> 3.0s")


def test_scene_cuts_found_at_the_right_time(clips):
    two = SceneCutFilter(min_shot_s=2.0)(Clip(clips["two_scenes"]))
    assert two.keep and two.reason == "ok"
    assert two.scores["cuts"] == [pytest.approx(SECONDS / 2, abs=1 / FPS)]
    assert len(two.scores["shots"]) == 2
    assert SceneCutFilter()(Clip(clips["moving"])).scores["cuts"] == []
    many = SceneCutFilter()(Clip(clips["many_cuts"]))
    assert not many.keep and many.reason.startswith("too many cuts: 0.80/s")


def test_motion_static_moving_slideshow_violent(clips):
    motion = MotionFilter()
    moving = motion(Clip(clips["moving"]))
    assert moving.keep and moving.reason == "ok", moving
    static = motion(Clip(clips["static"]))
    assert not static.keep and static.reason.startswith("static: motion")
    slideshow = motion(Clip(clips["slideshow"]))
    assert not slideshow.keep and slideshow.reason.startswith("slideshow: still for")
    violent = motion(Clip(clips["violent"]))
    assert not violent.keep and violent.reason.startswith("violent: motion")


def test_borders_and_sharpness(clips):
    letterbox = BorderFilter()(Clip(clips["letterbox"]))
    assert not letterbox.keep and letterbox.reason == "borders cover 0.38 > 0.15"
    assert letterbox.scores["borders_tblr"] == [0.1875, 0.1875, 0.0, 0.0]
    assert BorderFilter()(Clip(clips["moving"])).keep
    sharp = SharpnessFilter()(Clip(clips["sharp"]))
    blurry = SharpnessFilter()(Clip(clips["blurry"]))
    assert sharp.keep, sharp
    assert not blurry.keep and blurry.reason.startswith("blurry: sharpness")
    noisy = SharpnessFilter()(Clip(clips["noise"]))
    assert not noisy.keep and noisy.reason.startswith("noisy: sharpness")


def test_near_duplicates_across_the_dataset(clips):
    sig = {k: clip_signature(Clip(clips[k])) for k in ("moving", "shifted", "other")}
    assert (sig["moving"] ^ sig["shifted"]).bit_count() <= 12
    assert (sig["moving"] ^ sig["other"]).bit_count() > 40
    dedup = DuplicateFilter()
    assert dedup(Clip(clips["moving"], key="a")).keep
    assert dedup(Clip(clips["other"], key="b")).keep
    dup = dedup(Clip(clips["shifted"], key="c"))
    assert not dup.keep and dup.reason.startswith("near-duplicate of a (distance")
    assert dup.scores["duplicate_of"] == "a"


def test_duplicate_index_save_load(tmp_path):
    index = DuplicateIndex(bits=64, max_distance=3)
    index.add("x", 0b1011 << 40)
    assert index.query((0b1011 << 40) ^ 0b111) == ("x", 3)  # 3 flipped bits: match
    assert index.query((0b1011 << 40) ^ 0b1111) is None  # 4: beyond max_distance
    index.save(tmp_path / "index.json")
    again = DuplicateIndex.load(tmp_path / "index.json")
    assert len(again) == 1 and again.query(0b1011 << 40) == ("x", 0)


def test_captions():
    f = CaptionFilter(min_words=3, max_words=8)
    assert f(Clip("unused.mp4", caption="   ")).reason == "empty caption"
    assert f(Clip("unused.mp4", caption="a cat")).reason == "caption too short: 2 < 3 words"
    long = f(Clip("unused.mp4", caption="word " * 9))
    assert long.reason == "caption too long: 9 > 8 words" and not long.keep
    ok = f(Clip("unused.mp4", caption="a cat walks on a wall"))
    assert ok.keep and ok.scores == {"caption_words": 6}


def test_text_area_heuristic(clips):
    text_filter = ScoreFilter(TextAreaHeuristic(), max_score=0.05)
    text = text_filter(Clip(clips["text"]))
    clean = text_filter(Clip(clips["clean"]))
    assert not text.keep and text.reason.startswith("text_area ") and "> 0.05" in text.reason
    assert clean.keep and clean.scores["text_area"] < 0.01


def test_default_config_chain(clips):
    cfg = yaml.safe_load((ROOT / "conf/curate/default.yaml").read_text())
    filters = build_filters(cfg["filters"])
    assert [f.name for f in filters][:2] == ["probe", "caption"]  # cheap first
    caption = "a textured wall slides slowly past the camera"
    clip = Clip(clips["moving"], caption, analysis_fps=cfg["analysis"]["fps"])
    [dropped] = run_filters(clip, filters)
    assert (dropped.dropped_by, dropped.reason) == ("resolution", "min side 64 < 720")
    assert dropped.start_s is None and dropped.scores["caption_words"] == 8
    relaxed = [f for f in filters if f.name not in ("resolution", "sharpness")]
    [kept] = run_filters(clip, relaxed)  # one shot: no cut
    assert kept.keep and (kept.shot, kept.split_by) == (0, "scene_cuts"), kept
    assert kept.start_s == 1.0 and kept.scores["phash"] and "motion" in kept.scores


def test_concept_balancing_weights():
    captions = [
        "a cat sleeps on a sofa", "a kitten plays with yarn", "a cat chases a mouse",
        "two cats groom each other", "a cat jumps onto a table", "a fluffy cat yawns",
        "a red sports car races on a track", "a truck drives down a highway",
    ]
    labels, weights = ConceptBalancer(num_clusters=2)(captions)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    assert weights[0] < weights[6]
    assert weights[6] / weights[0] == pytest.approx(np.sqrt(6 / 2))
    assert weights.mean() == pytest.approx(1.0)
