"""The curation job against bad input and faults: single-shot splitting, a zoo of bad
members (each counted with its reason while the job finishes), truncated and replaced
shards, duplicate keys, a worker killed by the kernel, and libav's log lines."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import signal
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

import data.curate
from data.curate import DEFAULT_CONFIG, main
from data.curation import Clip, ProbeError, SceneCutFilter, probe_video, run_filters
from data.curation.job import filter_shard, write_curated_shard
from data.curation.raw import raw_samples
from data.shards import write_shard
from data.video import route_libav_logs, write_video
from tests.conftest import compose_train
from tests.media import audio_only
from tests.test_curate import CAPTION, FPS, _pan, shard_json
from trainer.precompute import precompute

COLOURS = {"red": 0, "blue": 2}


def _tinted(seed: int, channel: int, seconds: float = 5) -> np.ndarray:
    frames = _pan(seed, seconds).copy()
    frames[..., channel] //= 3
    return frames


def _mp4(tmp: Path, name: str, frames: np.ndarray) -> bytes:
    write_video(tmp / f"{name}.mp4", frames, FPS)
    return (tmp / f"{name}.mp4").read_bytes()


def two_shots(tmp: Path) -> bytes:
    """10 s: a reddish pan, then a hard cut at 5 s to a bluish pan of another texture."""
    return _mp4(tmp, "cut", np.concatenate([_tinted(1, 0), _tinted(7, 2)]))


def huge_mjpeg() -> bytes:
    """An mkv of MJPEG frames whose JPEG headers claim 60000x60000 pixels."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        for i in range(8):
            frame = np.full((64, 64, 3), 30 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    sof = bytes([0xFF, 0xC0, 0x00, 0x11, 0x08])  # start of frame: precision, height, width
    return buffer.getvalue().replace(sof + bytes([0, 64, 0, 64]),
                                     sof + (60000).to_bytes(2, "big") * 2)


def tar_of(path: Path, members: list[tuple[str, bytes]], compress: bool = False) -> None:
    """A tar of (name, bytes) exactly as given (write_shard would merge a key's members)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buffer.getvalue()) if compress else buffer.getvalue())


def chain_config(tmp: Path, **extra) -> Path:
    """The default chain with thresholds for 96x64 clips of a few seconds."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for spec in cfg["filters"]:
        spec.update({"resolution": {"min_side": 32}, "duration": {"min_s": 2.0},
                     "scene_cuts": {"min_shot_s": 2.0},
                     "sharpness": {"min_var": 0.0, "max_var": 1e9},
                     "duplicates": {"max_distance": 24}}.get(spec["name"], {}))
    cfg["balance"]["num_clusters"] = 2
    cfg.update(extra)
    path = tmp / "curate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp: Path, out: Path, pattern: str, *extra: str) -> dict:
    main([f"input={tmp}/{pattern}", f"output={out}", f"config={tmp}/curate.yaml",
          "wandb=disabled", "workers=1", *extra])
    return json.loads((out / "report.json").read_text())


def records(out: Path) -> dict[str, dict]:
    """Every pass-1 record of the saved work files, by key."""
    return {r["key"]: r for path in (out / ".work").glob("*.tar.*.json")
            for r in json.loads(path.read_text())["samples"]}


def test_a_source_is_split_into_its_single_shots(tmp_path, capsys):
    chain_config(tmp_path, balance={"num_clusters": 1, "seed": 0, "batch_size": 64})
    write_shard(tmp_path / "000000.tar", [
        {"__key__": "cut", "mp4": two_shots(tmp_path), "txt": CAPTION,
         "json": {"source": "cam1"}}])
    out = tmp_path / "curated"
    report = run(tmp_path, out, "000000.tar")
    assert (report["samples_in"], report["samples_out"]) == (1, 2), report["filters"]
    assert report["split"] == {"scene_cuts": {"sources": 1, "shots": 2}}
    table = capsys.readouterr().out
    assert "| scene_cuts: split into shots | 1 -> 2 |  | 2 |" in table

    metas = shard_json(out / "000000.tar")
    assert list(metas) == ["cut_s0", "cut_s1"]
    first, second = metas["cut_s0"], metas["cut_s1"]
    assert first["source"] == second["source"] == "cam1"
    # the cut at 5 s bounds both shots; the source's first second is skipped in shot 0
    assert (first["start"], second["start"]) == (1.0, pytest.approx(5.0, abs=1 / FPS))
    assert first["end"] == second["start"] and second["end"] == pytest.approx(10, abs=0.2)
    assert first["scores"]["shot"] == [0.0, first["end"]]
    assert first["scores"]["phash"] != second["scores"]["phash"]  # a signature each
    assert first["scores"]["motion"] != second["scores"]["motion"]  # judged apart
    assert report["hours_out"] == pytest.approx(9 / 3600, abs=1e-4)
    with tarfile.open(out / "000000.tar") as tar:
        assert sorted(tar.getnames()) == ["cut_s0.json", "cut_s0.mp4", "cut_s0.txt",
                                          "cut_s1.json", "cut_s1.mp4", "cut_s1.txt"]


def test_a_shot_below_min_shot_s_is_no_sample(tmp_path):
    """A 10 s source with a cut at 5 s and min_shot_s=6 has no shot: dropped, with why."""
    clip = tmp_path / "cut.mp4"
    clip.write_bytes(two_shots(tmp_path))
    decision = SceneCutFilter(min_shot_s=6.0)(Clip(str(clip)))
    assert not decision.keep and decision.reason == "no shot of 6.0s between the cuts"
    assert decision.scores["cuts"] == [pytest.approx(5.0, abs=1 / FPS)]
    split = SceneCutFilter(min_shot_s=2.0)(Clip(str(clip)))
    assert split.keep and len(split.split) == 2


class _Broken:
    """A filter with a bug (or a file it cannot handle)."""

    name = "broken"

    def __call__(self, clip):
        raise RecursionError("maximum recursion depth exceeded")


def test_a_filter_that_raises_is_one_samples_drop(tmp_path):
    clip = tmp_path / "cut.mp4"
    clip.write_bytes(two_shots(tmp_path))
    results = run_filters(Clip(str(clip)), [SceneCutFilter(min_shot_s=2.0), _Broken()])
    assert [(r.keep, r.dropped_by, r.shot) for r in results] == [(False, "broken", 0),
                                                                 (False, "broken", 1)]
    assert results[0].reason == "filter_error: broken: RecursionError: maximum recursion " \
                                "depth exceeded"
    start, end = results[1].scores["shot"]
    assert (start, end) == (pytest.approx(5.0, abs=1 / FPS), pytest.approx(10, abs=0.2))


GOOD_CAPTION = "a bright pattern of blobs drifts to the left"
DEEP = ("[" * 100_000 + "]" * 100_000).encode()
SURROGATE = b'{"caption": "a wall \\ud800 slides slowly past the camera"}'

# The bad-input zoo: (row, key, stage that drops it, start of its reason).
ZOO = [
    ("truncated mp4", "truncated", "probe", "undecodable"),
    ("zero-byte member", "empty", "probe", "undecodable"),
    ("wrong container (text in an .mp4)", "text", "probe", "undecodable"),
    ("audio only", "audio", "probe", "no video stream"),
    ("huge dimensions in the JPEG headers", "huge", "probe", "undecodable"),
    ("json nested 100,000 deep", "deep", "input", "bad_json: RecursionError"),
    ("malformed json", "broken", "input", "bad_json: JSONDecodeError"),
    ("caption with a lone surrogate", "surrogate", "input", "bad_caption: not encodable"),
    ("duplicate keys a/0001 and b/0001", "0001", "input", "duplicate_key: 2 samples"),
    ("member over max_member_bytes (gzipped tar)", "big", "input", "too_large: big.mp4"),
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Shard 0 holds a good clip and every bad member; shard 1 is a tar cut mid-member;
    shard 2 is gzipped and holds a member that compresses far below the size limit."""
    tmp = tmp_path_factory.mktemp("zoo")
    chain_config(tmp, max_member_bytes=3_000_000)
    good = _mp4(tmp, "good", _pan(3))
    mp4 = [("good.mp4", good), ("good.txt", GOOD_CAPTION.encode()),
           ("truncated.mp4", good[: len(good) // 2]), ("truncated.txt", CAPTION.encode()),
           ("empty.mp4", b""), ("empty.txt", CAPTION.encode()),
           ("text.mp4", b"this is a text file, not a video\n" * 50), ("text.txt", CAPTION.encode()),
           ("audio.mkv", audio_only()), ("audio.txt", CAPTION.encode()),
           ("huge.mkv", huge_mjpeg()), ("huge.txt", CAPTION.encode()),
           ("deep.mp4", good), ("deep.txt", CAPTION.encode()), ("deep.json", DEEP),
           ("broken.mp4", good), ("broken.json", b'{"caption": "a wall'),
           ("surrogate.mp4", good), ("surrogate.json", SURROGATE),
           ("a/0001.mp4", good), ("a/0001.txt", CAPTION.encode()),
           ("b/0001.mp4", _mp4(tmp, "other", _pan(4))), ("b/0001.txt", GOOD_CAPTION.encode())]
    tar_of(tmp / "000000.tar", mp4)
    second = [(f"s{i}.mp4", _mp4(tmp, f"s{i}", _pan(10 + i))) for i in range(2)]
    tar_of(tmp / "full1.tar", [*second, ("s0.txt", CAPTION.encode()),
                               ("s1.txt", GOOD_CAPTION.encode())])
    whole = (tmp / "full1.tar").read_bytes()
    (tmp / "000001.tar").write_bytes(whole[: len(whole) // 3])  # inside the first mp4
    tar_of(tmp / "000002.tar", [("big.mp4", bytes(5_000_000)), ("big.txt", CAPTION.encode()),
                                ("good2.mp4", _mp4(tmp, "good2", _pan(5))),
                                ("good2.txt", b"a grey texture slides to the left")],
           compress=True)
    out = tmp / "curated"
    with pytest.raises(SystemExit, match=r"1 shards were not published: 000001\.tar"):
        run(tmp, out, "{000000..000002}.tar")
    return tmp, out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("row, key, stage, reason", ZOO, ids=[row[0] for row in ZOO])
def test_bad_input_zoo(zoo, row, key, stage, reason):
    _, out, report = zoo
    record = records(out)[key]
    assert (record["keep"], record["dropped_by"]) == (False, stage), record
    assert record["reason"].startswith(reason), record["reason"]
    row = report["filters"][stage]
    kind = next(k for k in row["reasons"] if reason.startswith(k.split(":")[0].split(" ")[0]))
    assert row["reasons"][kind] >= 1 and kind in row["examples"]  # named, with an example
    if stage == "input":  # the example names a shard and sample of that kind
        assert re.match(rf"00000[02]\.tar/\w+: {kind}: ", row["examples"][kind])


def test_bad_input_zoo_job_finishes_and_counts(zoo):
    _, out, report = zoo
    # 13 raw samples in shards 0 and 2 (key 0001 counts twice); shard 1 is not in
    assert report["samples_in"] == 13 and report["samples_out"] == 2
    inputs = report["filters"]["input"]
    assert inputs["samples"] == 6
    assert inputs["reasons"] == {"bad_json": 2, "duplicate_key": 2, "bad_caption": 1,
                                 "too_large": 1}
    assert sorted({**shard_json(out / "000000.tar"), **shard_json(out / "000002.tar")}) == \
        ["good2_s0", "good_s0"]
    assert list(report["shard_errors"]) == ["000001.tar"]
    assert re.search(r"000001\.tar: (unreadable|truncated)", report["shard_errors"]["000001.tar"])
    assert not (out / "000001.tar").exists()


def test_a_repaired_shard_is_read_again_on_restart(zoo):
    tmp, out, _ = zoo
    before = sorted(p.name for p in (out / ".work").glob("000001.tar.*.json"))
    assert before == []  # a shard error leaves no result behind, so a restart retries
    (tmp / "000001.tar").write_bytes((tmp / "full1.tar").read_bytes())
    report = run(tmp, out, "{000000..000002}.tar")
    assert report["shard_errors"] == {}
    assert sorted(shard_json(out / "000001.tar")) == ["s0_s0", "s1_s0"]
    # replaced in place (same path): judged again because its size and time changed
    tar_of(tmp / "000001.tar", [("s9.mp4", _mp4(tmp, "s9", _pan(20))),
                                ("s9.txt", CAPTION.encode())])
    report = run(tmp, out, "{000000..000002}.tar")
    assert sorted(shard_json(out / "000001.tar")) == ["s9_s0"]
    assert len(list((out / ".work").glob("000001.tar.*.json"))) == 2  # old one unused


def test_pass3_does_not_publish_a_shard_cut_short(tmp_path):
    """Pass 1 read the shard whole; it is cut before pass 3 copies it: no shard appears."""
    chain_config(tmp_path)
    good = _mp4(tmp_path, "good", _pan(3))
    shard = tmp_path / "000000.tar"
    tar_of(shard, [("a.mp4", good), ("a.txt", GOOD_CAPTION.encode()),
                   ("b.mp4", good), ("b.txt", GOOD_CAPTION.encode())])
    specs = yaml.safe_load((tmp_path / "curate.yaml").read_text())
    work = filter_shard("000000.tar", str(shard), str(tmp_path / "work.json"), specs["filters"],
                        specs["analysis"], 10**9)
    assert [r["keep"] for r in work["samples"]] == [True, True]
    stat = shard.stat()
    with tarfile.open(shard) as tar:
        cut = tar.getmember("b.mp4").offset_data + len(good) // 2
    shard.write_bytes(shard.read_bytes()[:cut])  # b's video ends half-way
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    work["identity"]["size"] = shard.stat().st_size  # as if the disk lied about it
    out = tmp_path / "out.tar"
    error = write_curated_shard(str(shard), str(out), str(tmp_path / "stamp"), work, 10**9)
    assert re.search(r"000000\.tar: (unreadable|truncated)", error), error
    assert not out.exists() and not Path(f"{out}.tmp").exists()


def _die_on_shard_1(name: str, *job):
    """Pass 1 that the kernel kills on shard 000001.tar (as for memory)."""
    if name == "000001.tar":
        os.kill(os.getpid(), signal.SIGKILL)
    return filter_shard(name, *job)


def _hung(signum, frame):
    raise TimeoutError("the job hung after its worker was killed")


def test_a_worker_killed_by_the_kernel_fails_the_job_naming_its_shard(tmp_path, monkeypatch):
    chain_config(tmp_path)
    for s in range(3):
        write_shard(tmp_path / f"{s:06d}.tar", [
            {"__key__": f"k{s}", "mp4": _mp4(tmp_path, f"k{s}", _pan(s)), "txt": CAPTION}])
    monkeypatch.setattr(data.curate, "filter_shard", _die_on_shard_1)
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(600)  # a hang fails this test instead of stalling the suite
    try:
        with pytest.raises(SystemExit) as failed:
            main([f"input={tmp_path}/{{000000..000002}}.tar", f"output={tmp_path / 'out'}",
                  f"config={tmp_path}/curate.yaml", "wandb=disabled", "workers=2"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    message = str(failed.value)
    assert "pass 1 (the filters) failed on 1 shards" in message
    assert "000001.tar: its worker process was killed by SIGKILL" in message
    done = sorted(p.name[:10] for p in (tmp_path / "out/.work").glob("*.tar.*.json"))
    assert done == ["000000.tar", "000002.tar"]  # the others finished and are kept


def test_the_member_size_limit_is_checked(tmp_path):
    chain_config(tmp_path)
    (tmp_path / "000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"max_member_bytes=0 .* must be a whole number"):
        run(tmp_path, tmp_path / "out", "000000.tar", "max_member_bytes=0")
    with pytest.raises(SystemExit, match=r"libav_log='loud' must be one of"):
        run(tmp_path, tmp_path / "out", "000000.tar", "libav_log=loud")


def test_libav_messages_go_to_logging_not_stderr(tmp_path, capfd, caplog):
    good = _mp4(tmp_path, "good", _pan(1))
    (tmp_path / "good.mp4").write_bytes(good)
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])  # the moov atom is at the end
    SceneCutFilter()(Clip(str(tmp_path / "good.mp4")))  # once made every later line print
    with pytest.raises(ProbeError, match="Invalid data"):
        probe_video(tmp_path / "cut.mp4")
    assert "moov atom not found" not in capfd.readouterr().err
    try:
        route_libav_logs("error")
        with caplog.at_level(logging.ERROR, logger="libav"), pytest.raises(ProbeError):
            probe_video(tmp_path / "cut.mp4")
    finally:
        route_libav_logs("off")
    assert any("moov atom not found" in r.getMessage() and r.name.startswith("libav")
               for r in caplog.records)
    assert "moov atom not found" not in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["inside a member", "between members", "piped"])
def test_precompute_publishes_no_shard_read_part_way(tmp_path, cut):
    """A raw shard cut short gives no cache shard (a restart retries it), whether the cut
    falls inside a member, exactly between two (a tar that reads as complete), or the
    shard comes through a pipe."""
    from tests.test_precompute import raw as overrides
    from tests.test_shards import clip

    square = clip(tmp_path, "square", 8, 32, 32)
    samples = [{"__key__": f"k{i}", "mp4": square, "txt": f"a square clip {i}"} for i in range(3)]
    write_shard(tmp_path / "000000.tar", samples)
    write_shard(tmp_path / "full.tar", samples)
    with tarfile.open(tmp_path / "full.tar") as tar:
        k1, k2 = tar.getmember("k1.mp4"), tar.getmember("k2.mp4")
    whole = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "000001.tar").write_bytes(
        whole[: k2.offset if cut == "between members" else k1.offset_data + 100])
    pattern = f"{tmp_path}/{{000000..000001}}.tar"
    cfg = compose_train(overrides(f"pipe:cat {pattern}" if cut == "piped" else pattern))
    out = tmp_path / "cache"
    counts = precompute(cfg, str(out), batch=2)
    assert (counts["shard_errors"], counts["shards_written"], counts["samples_written"]) == \
        (1, 1, 3), counts
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".tmp")) == ["000000.tar"]
    (tmp_path / "000001.tar").write_bytes(whole)  # repaired: the restart writes it
    again = precompute(cfg, str(out), batch=2)
    assert again == {"shards_done_before": 1, "shards_written": 1, "samples_written": 3}


def test_a_folders_colliding_keys_and_bad_captions_are_dropped_unread(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/b.mp4", "a_b.mp4", "c.mp4", "d.mp4", "e.mp4"):
        (tmp_path / name).write_bytes(b"x" * 10)
    (tmp_path / "e.mp4").write_bytes(b"x" * 100)
    chunk = {"folder": str(tmp_path), "items": [
        ["a/b.mp4", CAPTION], ["a_b.mp4", CAPTION], ["c.mp4", "a wall \ud800 slides"],
        ["d.mp4", CAPTION], ["e.mp4", CAPTION]]}
    samples = list(raw_samples(chunk, max_member_bytes=50))
    assert [(s.key, (s.problem or "ok").split(":")[0]) for s in samples] == [
        ("a_b_mp4", "duplicate_key"), ("a_b_mp4", "duplicate_key"), ("c_mp4", "bad_caption"),
        ("d_mp4", "ok"), ("e_mp4", "too_large")]
    assert samples[3].members == {"txt": CAPTION.encode(), "mp4": b"x" * 10,
                                  "json": b'{"source_file": "d.mp4"}'}
