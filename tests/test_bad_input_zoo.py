"""The bad-input zoo of the training loader and ``trainer.precompute``: one real tar shard
per row, holding a good sample and one bad member of a kind. Each bad one is skipped and
counted with its reason named, the good sample still arrives, and the job finishes."""

from __future__ import annotations

import logging
import tarfile

import pytest

from data.shards import ShardBatches
from tests.conftest import compose_train
from tests.media import audio_only
from tests.test_curation_hardening import DEEP, SURROGATE, tar_of
from tests.test_precompute import members, raw
from tests.test_shards import clip, png
from trainer.precompute import precompute

CAPTION = b"a grey square fades in"
LIMIT = 300_000  # data.max_member_bytes of the zoo: above the good clip, below "big"


def captioned(name: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(f"{name}.mp4", data), (f"{name}.txt", CAPTION)]


# (row, the shard's members after the good sample's, the reason counted, the keys kept);
# "cut" rows are written whole, then cut half-way through their last member.
ZOO = [
    ("truncated mp4", lambda good: captioned("bad", good[: len(good) // 2]), "corrupt_video"),
    ("zero-byte mp4", lambda good: captioned("bad", b""), "empty_member"),
    ("text named .mp4", lambda good: captioned("bad", b"not a video\n" * 50), "corrupt_video"),
    ("PNG named .mp4 (one frame, no duration)", lambda good: captioned("bad", png(32, 32)),
     "too_short"),
    ("audio-only mp4", lambda good: captioned("bad", audio_only("mp4")), "no_video_stream"),
    ("json nested 100,000 deep", lambda good: [("bad.mp4", good), ("bad.json", DEEP)],
     "bad_json"),
    ("caption with a lone surrogate", lambda good: [("bad.mp4", good), ("bad.json", SURROGATE)],
     "bad_caption"),
    ("non-finite weight", lambda good: [("bad.mp4", good),
                                        ("bad.json", b'{"caption": "c", "weight": NaN}')],
     "bad_weight"),
    ("negative weight", lambda good: [("bad.mp4", good),
                                      ("bad.json", b'{"caption": "c", "weight": -2}')],
     "bad_weight"),
    ("two .mp4 members of one key", lambda good: [*captioned("bad", good), ("bad.mp4", good)],
     "duplicate_key"),
    ("a key again after another sample",
     lambda good: [*captioned("other", good), *captioned("good", good)], "duplicate_key",
     ["good", "other"]),
    ("member over data.max_member_bytes", lambda good: captioned("bad", bytes(LIMIT + 1)),
     "too_large"),
    ("tar cut inside a member (cut)", lambda good: captioned("bad", good), "bad_shard"),
]
ROWS = [row[0] for row in ZOO]


def kept(row: tuple) -> list[str]:
    return row[3] if len(row) > 3 else ["good"]


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(folder of the row shards, the config that reads them)."""
    tmp = tmp_path_factory.mktemp("zoo")
    good = clip(tmp, "good", 8, 32, 32)
    assert len(good) < LIMIT
    for index, (name, bad, *_) in enumerate(ZOO):
        path = tmp / shard_name(index)
        tar_of(path, [*captioned("good", good), *bad(good)])
        if name.endswith("(cut)"):
            with tarfile.open(path) as tar:
                last = tar.getmembers()[-2]  # the bad sample's mp4
            path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    pattern = f"{tmp}/{{000000..{len(ZOO) - 1:06d}}}.tar"
    return tmp, compose_train(raw(pattern, f"data.max_member_bytes={LIMIT}"))


@pytest.mark.parametrize("row", ZOO, ids=ROWS)
def test_the_loader_counts_the_bad_sample_and_yields_the_good_one(zoo, row, caplog):
    tmp, cfg = zoo
    path = str(tmp / shard_name(ZOO.index(row)))
    loader = ShardBatches(cfg.data.dataset(path, "data.shards", epochs=1))
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        keys = sorted(key for batch in loader for key in batch["key"])
    assert keys == kept(row)
    assert loader.skipped == {row[2]: 1}
    logged = (f"skipping the rest of shard {path}" if row[2] == "bad_shard"
              else f"of shard {path}: {row[2]}")
    assert logged in caplog.text


@pytest.fixture(scope="module")
def precomputed(zoo, tmp_path_factory):
    """(cache folder, counts, log text) of one precompute over every row's shard."""
    _, cfg = zoo
    out = tmp_path_factory.mktemp("cache")
    handler = logging.Handler()
    lines = []
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("trainer.precompute")
    logger.addHandler(handler)
    try:
        counts = precompute(cfg, str(out), batch=2)
    finally:
        logger.removeHandler(handler)
    return out, counts, "\n".join(lines)


@pytest.mark.parametrize("row", ZOO, ids=ROWS)
def test_precompute_counts_the_bad_sample_and_caches_the_good_one(zoo, precomputed, row):
    tmp, _ = zoo
    out, _, log = precomputed
    name = shard_name(ZOO.index(row))
    if row[2] == "bad_shard":  # a shard read part-way is never published: a rerun retries it
        assert not (out / name).exists()
        assert f"cache shard {name} not written: {tmp / name}: " in log
        return
    assert sorted(members(out / name)) == kept(row)
    assert f"of shard {tmp / name}: {row[2]}" in log


def test_precompute_finishes_with_every_reason_counted(precomputed):
    _, counts, _ = precomputed
    reasons = [row[2] for row in ZOO if row[2] != "bad_shard"]
    expected = {reason: reasons.count(reason) for reason in reasons}
    assert {k: v for k, v in counts.items() if k in expected} == expected
    assert counts["shard_errors"] == 1 and counts["shards_written"] == len(ZOO) - 1
    assert counts["samples_written"] == sum(len(kept(row)) for row in ZOO[:-1])
