"""``python -m data.select``: the top N curated clips by a weighted score go to small train
and held-out shards that the training loader reads; clips without the score are skipped
and counted; bad options fail naming them."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

from data.select import main, rank_fractions
from data.shards import ShardBatches, VideoShards, write_shard
from tests.conftest import ROOT, python_cmd
from tests.test_shards import clip, grid

# key -> (sharpness, motion) as the curation job writes them into each json's scores
SCORES = {"a": (300.0, 2.0), "b": (900.0, 1.0), "c": (500.0, 9.0), "d": (700.0, 4.0),
          "e": (1500.0, 3.0), "f": (1100.0, 6.0), "g": (200.0, 8.0), "h": (1300.0, 5.0)}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curated")
    video = clip(tmp, "v", 8, 32, 64)
    samples = [{"__key__": key, "mp4": video, "txt": f"clip {key}",
                "json": {"scores": {"sharpness": s, "motion": m}, "weight": 1.5,
                         "start": 0.0, "end": 1.0}} for key, (s, m) in SCORES.items()]
    samples.append({"__key__": "nomotion", "mp4": video, "txt": "clip",
                    "json": {"scores": {"sharpness": 5000.0}}})
    samples.append({"__key__": "broken", "mp4": video, "txt": "clip", "json": "{not json"})
    write_shard(tmp / "000000.tar", samples[:5])
    write_shard(tmp / "000001.tar", samples[5:])
    return tmp


def select(curated, out, *options):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(python_cmd("data.select", f"input={curated}/{{000000..000001}}.tar",
                                     f"output={out}", *options),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def keys_in(path) -> dict[str, dict]:
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0]: json.load(tar.extractfile(m))
                for m in tar if m.name.endswith(".json")}


def test_top_n_by_score_into_train_and_val_shards_the_loader_reads(curated, tmp_path):
    out = tmp_path / "sft"
    result = select(curated, out, "top=5", "val=1", "shard_size=2", "score.sharpness=1",
                    "score.motion=1")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "selection.json").read_text())
    # each score becomes its rank in [0, 1]; their sum ranks the clips
    sharp = dict(zip(SCORES, rank_fractions([s for s, _ in SCORES.values()]), strict=True))
    moving = dict(zip(SCORES, rank_fractions([m for _, m in SCORES.values()]), strict=True))
    expected = sorted(SCORES, key=lambda k: -(sharp[k] + moving[k]))[:5]
    # ties (f and h, c and e) keep the input order
    assert [p["key"] for p in report["picks"]] == expected == ["f", "h", "c", "e", "d"]
    assert report["skipped"] == {"missing_motion": 1, "bad_json": 1}
    assert report["picked"] == {"train": 4, "val": 1}
    assert "picked 5 of 8 scored clips (4 train, 1 val)" in result.stdout
    assert f"data.val_shards='{out}/val/{{000000..000000}}.tar'" in result.stdout

    train = {**keys_in(out / "train" / "000000.tar"), **keys_in(out / "train" / "000001.tar")}
    val = keys_in(out / "val" / "000000.tar")
    assert sorted([*train, *val]) == sorted(expected) and len(val) == 1
    meta = train.get("f") or val["f"]
    assert meta["select"] == {"score": pytest.approx(10 / 7), "rank": 0}
    assert (meta["start"], meta["end"]) == (0.0, 1.0)
    assert meta["curation_weight"] == 1.5 and "weight" not in meta  # each once per epoch

    loader = ShardBatches(VideoShards(report["shards"]["train"], grid(batch_sizes=[1, 1]),
                                      8.0, epochs=1))
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(train)
    assert batches[0]["video"].shape == (1, 3, 8, 16, 32)


def test_one_score_picks_the_highest_and_a_negative_weight_the_lowest(curated, tmp_path):
    report = main([f"input={curated}/{{000000..000001}}.tar", f"output={tmp_path}/a", "top=3",
                   "score.sharpness=1"])
    assert [p["key"] for p in report["picks"]] == ["nomotion", "e", "h"]  # needs no motion
    report = main([f"input={curated}/{{000000..000001}}.tar", f"output={tmp_path}/b", "top=2",
                   "score.motion=-1"])
    assert [p["key"] for p in report["picks"]] == ["b", "a"]
    ties = rank_fractions([3.0, 1.0, 3.0, 2.0]).tolist()  # tied values share their mean rank
    assert ties == pytest.approx([5 / 6, 0.0, 5 / 6, 1 / 3])


@pytest.mark.parametrize("options, message", [
    (["top=2"], "score.NAME=WEIGHT is required"),
    (["top=2", "val=2", "score.motion=1"], "val=2 must lie in [0, top=2)"),
    (["top=2", "score.aesthetic=1"], "no clip of input carries every weighted score"),
])
def test_bad_options_fail_naming_them(curated, tmp_path, options, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace(")", r"\)")):
        main([f"input={curated}/{{000000..000001}}.tar", f"output={tmp_path}/x", *options])


def test_an_output_of_another_selection_is_refused(curated, tmp_path):
    args = [f"input={curated}/{{000000..000001}}.tar", f"output={tmp_path}/o", "top=2"]
    main([*args, "score.motion=1"])
    main([*args, "score.motion=1"])  # the same selection again is fine
    with pytest.raises(SystemExit, match="holds a selection made with other options"):
        main([*args, "score.sharpness=1"])
