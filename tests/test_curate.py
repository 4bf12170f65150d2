"""The curation job end to end: two raw shards of real PyAV clips through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from data.buckets import BucketGrid
from data.curate import DEFAULT_CONFIG
from data.curation import AspectBalancer
from data.shards import ShardBatches, VideoShards, write_shard
from data.video import write_video
from tests.conftest import ROOT, python_cmd

H, W, FPS = 64, 96, 8


def _pan(seed: int, seconds: float = 5, cell: int = 8, skip: int = 0) -> np.ndarray:
    """RGB frames of a smooth random texture panning 1 px per frame, from `skip` px on
    (< 2 * cell: the texture depends only on `seed` and `cell`)."""
    frames = int(seconds * FPS)
    rng = np.random.default_rng(seed)
    knots = rng.integers(0, 256, (H // cell, (W + frames) // cell + 2), dtype=np.uint8)
    strip = cv2.resize(knots, (knots.shape[1] * cell, H), interpolation=cv2.INTER_CUBIC)
    grey = np.stack([strip[:, skip + i: skip + i + W] for i in range(frames)])
    return np.repeat(grey[..., None], 3, axis=3)


def _mp4(tmp: Path, name: str, frames: np.ndarray, crf: int = 18) -> bytes:
    write_video(tmp / f"{name}.mp4", frames, FPS, crf=crf)
    return (tmp / f"{name}.mp4").read_bytes()


CAPTION = "a textured grey wall slides slowly past the camera"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("raw")
    moving = _pan(1)
    write_shard(tmp / "000000.tar", [
        {"__key__": "good", "mp4": _mp4(tmp, "good", moving), "txt": CAPTION,
         "json": {"source": "cam1"}},
        {"__key__": "static", "mp4": _mp4(tmp, "static", np.repeat(moving[:1], 40, 0)),
         "txt": CAPTION},
        {"__key__": "short", "mp4": _mp4(tmp, "short", _pan(2, seconds=2)), "txt": CAPTION},
        {"__key__": "corrupt", "mp4": np.random.default_rng(0).bytes(4096), "txt": CAPTION},
    ])
    write_shard(tmp / "000001.tar", [
        # the good clip 2 px further on, re-encoded coarsely: a near-duplicate across shards
        {"__key__": "dup", "mp4": _mp4(tmp, "dup", _pan(1, skip=2), crf=30), "txt": CAPTION},
        {"__key__": "other", "mp4": _mp4(tmp, "other", _pan(3)),
         "json": {"caption": "a bright pattern of blobs drifts to the left"}},
        {"__key__": "terse", "mp4": _mp4(tmp, "terse", _pan(4)), "txt": "a wall"},
    ])
    # The default chain with thresholds for 96x64 clips of 5 s.
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for spec in cfg["filters"]:
        spec.update({"resolution": {"min_side": 32}, "duration": {"min_s": 2.0},
                     "scene_cuts": {"min_shot_s": 2.0},
                     "sharpness": {"min_var": 0.0, "max_var": 1e9},
                     # pHash of 64 px frames is coarse: the shifted re-encode lies 16 apart
                     "duplicates": {"max_distance": 24}}.get(spec["name"], {}))
    cfg["balance"]["num_clusters"] = 4
    (tmp / "curate.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


def curate(raw: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [f"input={raw}/{{000000..000001}}.tar", f"output={out}", f"config={raw}/curate.yaml",
            "wandb=disabled", "workers=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(python_cmd("data.curate", *args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def shard_json(path: Path) -> dict[str, dict]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0]: json.load(tar.extractfile(m))
                for m in tar if m.name.endswith(".json")}


def test_curate_funnel_output_and_restart(raw, tmp_path):
    out = tmp_path / "curated"
    first = curate(raw, out)
    assert first.returncode == 0, first.stderr
    assert "| stage | removed |" in first.stdout and "| duplicates | 1 |" in first.stdout

    report = json.loads((out / "report.json").read_text())
    assert (report["samples_in"], report["samples_out"]) == (7, 2)
    removed = {name: row["samples"] for name, row in report["filters"].items() if row["samples"]}
    assert removed == {"probe": 1, "caption": 1, "duration": 1, "motion": 1, "duplicates": 1}
    reasons = report["filters"]
    assert list(reasons["duplicates"]["reasons"]) == ["near-duplicate"]
    assert list(reasons["caption"]["reasons"]) == ["caption too short: N < N words"]
    assert next(iter(reasons["probe"]["reasons"])).startswith("undecodable")
    assert reasons["motion"]["hours"] == pytest.approx(5 / 3600, abs=1e-4)
    assert report["hours_out"] == pytest.approx(2 * 4 / 3600, abs=1e-4)  # first second skipped

    metas = {**shard_json(out / "000000.tar"), **shard_json(out / "000001.tar")}
    assert sorted(metas) == ["good_s0", "other_s0"]  # each source's single shot
    good = metas["good_s0"]
    assert good["source"] == "cam1" and good["start"] == 1.0
    assert good["end"] == pytest.approx(5.0, abs=0.2)
    assert {"motion", "phash", "sharpness", "text_area"} <= set(good["scores"])
    assert all(m["weight"] == pytest.approx(1.0) for m in metas.values())  # 2 clusters of 1
    assert metas["other_s0"]["caption"].startswith("a bright pattern")

    grid = BucketGrid([[H, W]], [16], [1], 1)
    batch = next(iter(ShardBatches(VideoShards(str(out / "{000000..000001}.tar"), grid, FPS,
                                               epochs=1))))
    assert batch["video"].shape == (1, 3, 16, H, W) and batch["key"][0] in metas

    # Restart: intermediate and curated shards are reused, the result is the same.
    work = sorted((out / ".work").glob("*.tar.*.json"))
    stamps = [p.stat().st_mtime_ns for p in [*work, out / "000000.tar"]]
    second = curate(raw, out)
    assert second.returncode == 0, second.stderr
    assert [p.stat().st_mtime_ns for p in [*work, out / "000000.tar"]] == stamps
    assert json.loads((out / "report.json").read_text()) == report

    changed = curate(raw, out, "filters.motion.min_motion=0.01")
    assert changed.returncode != 0 and "different filter config" in changed.stderr


def test_curate_rejects_a_missing_input(raw, tmp_path):
    result = curate(raw / "nope", tmp_path / "out")
    assert result.returncode != 0 and "input=" in result.stderr
    assert "do not exist" in result.stderr


def test_curate_a_folder_with_a_captions_jsonl(raw, tmp_path):
    captions = tmp_path / "captions.jsonl"
    lines = [{"file": "good.mp4", "caption": CAPTION}, {"file": "gone.mp4", "caption": CAPTION},
             {"file": "other.mp4", "caption": "a bright pattern of blobs drifts to the left"}]
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "curated"
    result = curate(raw, out, f"input={raw}", f"captions={captions}", "shard_size=2",
                    "workers=1")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["samples_in"], report["samples_out"]) == (3, 2)
    assert list(report["filters"]["media"]["reasons"]) == [
        "no media file: no mp4/webm/mkv/mov member (has json, txt)"]
    metas = {**shard_json(out / "000000.tar"), **shard_json(out / "000001.tar")}
    assert sorted(metas) == ["good_mp4_s0", "other_mp4_s0"]
    assert metas["good_mp4_s0"]["source_file"] == "good.mp4"
    assert metas["good_mp4_s0"]["start"] == 1.0


def test_curate_balances_the_landscape_portrait_mix(raw, tmp_path):
    """3 landscape, 1 portrait, 1 square clip: weights move the landscape share of the
    expected samples to the configured 60%, on top of the concept weights."""
    pans = {f"land{i}": _pan(10 + i) for i in range(3)}
    pans["port"] = np.ascontiguousarray(_pan(20).transpose(0, 2, 1, 3))  # 64 wide, 96 high
    pans["square"] = np.ascontiguousarray(_pan(21)[:, :, 16:80])
    captions = {"land0": "a grey stone wall slides slowly past the camera",
                "land1": "a grey brick wall slides slowly past the camera",
                "land2": "a bright pattern of blobs drifts to the left",
                "port": "a tall grey wall scrolls slowly upwards in the frame",
                "square": "a bright pattern of soft blobs drifts to the left"}
    write_shard(tmp_path / "000000.tar", [
        {"__key__": key, "mp4": _mp4(tmp_path, key, frames), "txt": captions[key]}
        for key, frames in pans.items()])
    write_shard(tmp_path / "000001.tar", [])
    out = tmp_path / "curated"
    result = curate(raw, out, f"input={tmp_path}/{{000000..000001}}.tar",
                    "balance.num_clusters=2", "aspect_mix.max_factor=4")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["samples_out"] == 5, report["filters"]
    mix = report["aspect_mix"]
    assert mix["clips"] == {"landscape": 3, "portrait": 1, "square": 1}
    assert mix["landscape_after"] == pytest.approx(0.6, abs=1e-4)
    assert "Aspect mix, landscape:portrait share" in result.stdout
    assert "-> 60.0%:40.0%" in result.stdout

    metas = {key.removesuffix("_s0"): meta for key, meta in shard_json(out / "000000.tar").items()}
    assert {k: m["orientation"] for k, m in metas.items()} == {
        "land0": "landscape", "land1": "landscape", "land2": "landscape", "port": "portrait",
        "square": "square"}
    # the weight is the concept weight (1/sqrt(cluster size), mean 1) times the aspect factor
    sizes = {c: sum(m["cluster"] == c for m in metas.values()) for c in (0, 1)}
    concept = {k: sizes[m["cluster"]] ** -0.5 for k, m in metas.items()}
    mean = sum(concept.values()) / len(concept)
    for key, meta in metas.items():
        assert meta["weight"] == pytest.approx(concept[key] / mean * meta["aspect_factor"],
                                               abs=1e-5)
    assert metas["square"]["aspect_factor"] == 1.0  # squares are left out of the mix
    land = sum(m["weight"] for k, m in metas.items() if k.startswith("land"))
    assert land / (land + metas["port"]["weight"]) == pytest.approx(0.6, abs=1e-4)


def test_aspect_balancer_caps_the_factor_and_reports_the_shortfall():
    balancer = AspectBalancer(landscape=0.6, squares="portrait", max_factor=2.0)
    # 8 landscape (16:9), 1 portrait (9:16), 1 square counted as portrait; all weight 1
    factors, kinds, report = balancer([16 / 9] * 8 + [9 / 16, 1.0], [1.0] * 10)
    assert kinds == ["landscape"] * 8 + ["portrait", "square"]
    assert factors[8] == factors[9] == pytest.approx(2 * factors[0])  # capped at 2x
    assert factors.sum() == pytest.approx(10)  # the epoch keeps its length
    assert report["landscape_before"] == 0.8
    assert report["landscape_after"] == pytest.approx(8 / 12, abs=1e-6)  # short of 0.6
    _, _, alone = balancer([16 / 9, 4 / 3], [1.0, 2.0])  # no portrait clip: nothing to do
    assert alone["factors"] == {"landscape": 1.0, "portrait": 1.0}
    with pytest.raises(ValueError, match=r"aspect_mix.landscape=1.5 must lie in \(0, 1\)"):
        AspectBalancer(landscape=1.5)
    with pytest.raises(ValueError, match="aspect_mix.squares='both' must be one of"):
        AspectBalancer(squares="both")
