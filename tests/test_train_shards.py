"""``data=webdataset`` end to end: the trainer reads real tar shards, skips and counts a
corrupt sample, and resumes from a checkpoint with every later loss bitwise equal."""

from __future__ import annotations

import json

import pytest

from data.shards import write_shard
from tests.conftest import python_cmd
from tests.test_shards import clip
from tests.test_train_e2e import QUIET, run, train_losses

pytestmark = pytest.mark.slow

SMALL = ["model.depth=2", "model.width=64", "model.heads=4", "model.ffn_dim=128",
         "text.encoders.byte.dim=64", "text.encoders.byte.depth=1",
         "text.encoders.byte.ffn_dim=128", "recipe.warmup_steps=2",
         # constant after warm-up: the stop at step 3 (max_steps=3) then changes no LR
         "recipe.schedule=constant", "trainer.progress=false",
         "trainer.ckpt_every=3", "trainer.log_every=1"]


def shard_cmd(run_dir, pattern, *overrides):
    return python_cmd("trainer.train", f"hydra.run.dir={run_dir}", "experiment=t2v_tiny",
                      "data=webdataset", f"data.shards='{pattern}'",
                      "data.sizes=[[16,16],[16,32],[32,16]]", "data.durations=[4,8]",
                      "data.batch_sizes=[2,2]", "data.image_batch_size=2", "data.fps=8",
                      "data.num_workers=0", "model=dit_tiny", *SMALL, *QUIET, *overrides)


def test_trains_from_shards_counts_bad_samples_and_resumes_exactly(tmp_path):
    media = {"land": clip(tmp_path, "land", 8, 32, 64), "port": clip(tmp_path, "port", 5, 48, 24),
             "square": clip(tmp_path, "square", 8, 32, 32)}
    for index in range(3):
        samples = [{"__key__": f"s{index}_{kind}", "mp4": data, "txt": f"a {kind} clip",
                    "json": json.dumps({"source": "test"})} for kind, data in media.items()]
        samples.append({"__key__": f"s{index}_broken", "mp4": media["land"][:300],
                        "txt": "truncated"})
        write_shard(tmp_path / f"{index:06d}.tar", samples)
    pattern = str(tmp_path / "{000000..000002}.tar")

    uninterrupted = tmp_path / "uninterrupted"
    run(shard_cmd(uninterrupted, pattern, "trainer.max_steps=5"))
    losses = train_losses(uninterrupted)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    records = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    assert max(r.get("skipped_corrupt_video", 0) for r in records if r["kind"] == "train") >= 1

    resumed = tmp_path / "resumed"
    run(shard_cmd(resumed, pattern, "trainer.max_steps=3"))
    result = run(shard_cmd(resumed, pattern, "trainer.max_steps=5"))
    assert "resumed from" in result.stdout
    assert train_losses(resumed) == losses  # exact float equality, every step
