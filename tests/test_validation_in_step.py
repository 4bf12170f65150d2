"""Validation on ranks whose held-out data differ: a val shard read error on one rank must
not leave the ranks running different numbers of forward passes (a hang in the forward's
collectives); they stop together, and the log says who stopped them and why."""

from __future__ import annotations

import tarfile
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist

from data.shards import WebDatasetConfig, build_val_shard_batches, write_shard
from parallel.mesh import MeshDims, init_parallel
from tests.distributed import run_distributed
from tests.test_shards import FPS, GRID, clip
from trainer.validation import validate_in_step

VAL_BATCHES = 10  # trainer.val_batches: more than any rank holds


class CollectiveTask:
    """Validates like a model sharded over every rank: each batch's forward is a
    collective (an all-reduce of the batch size), so a rank that runs fewer hangs the rest."""

    def __init__(self):
        self.forwards, self.samples = 0, 0

    def validate(self, model, batches):
        for batch in islice(batches, VAL_BATCHES):
            size = torch.tensor([float(len(batch["key"]))])
            dist.all_reduce(size)
            self.forwards += 1
            self.samples += int(size.item())
        return {"loss": float(self.samples)}


class Log:
    def __init__(self):
        self.lines, self.records = [], []

    def write(self, message: str) -> None:
        self.lines.append(message)

    def record(self, kind: str, step: int, **values) -> None:
        self.records.append((kind, step, values))


def _validate_on_this_rank(folder: str) -> dict:
    ctx = init_parallel(MeshDims(dp_shard=1, tp=2), timeout_minutes=1.0)
    results = {}
    for case in ("short", "other"):
        cfg = WebDatasetConfig(val_shards=f"{folder}/{case}/rank{ctx.rank}/{{0..1}}.tar",
                               fps=FPS, num_workers=0, **GRID)
        task, log = CollectiveTask(), Log()
        metrics = validate_in_step(task, None, partial(build_val_shard_batches, cfg), ctx,
                                   step=7, monitor=log)
        results[case] = {"forwards": task.forwards, "metrics": metrics, "lines": log.lines,
                         "records": log.records}
    return results


def cut_inside_member(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


def test_ranks_with_different_held_out_data_run_the_same_forwards(tmp_path):
    video = clip(tmp_path, "v", 8, 16, 16)  # one 8-frame 16x16 bucket: batches of 2
    for case in ("short", "other"):
        for rank in range(2):
            for s in range(2):
                write_shard(tmp_path / case / f"rank{rank}" / f"{s}.tar",
                            [{"__key__": f"s{s}_{i}", "mp4": video, "txt": f"clip {s} {i}"}
                             for i in range(4)])
    # short: rank 1's copy of shard 1 breaks off in its third sample (6 samples, not 8);
    # other: rank 1 cannot read shard 0 at all, so its batches are shard 1's
    cut_inside_member(tmp_path / "short" / "rank1" / "1.tar", "s1_2.mp4")
    (tmp_path / "other" / "rank1" / "0.tar").write_bytes(b"not a tar")

    ranks = run_distributed(_validate_on_this_rank, 2, str(tmp_path), timeout=120)

    short = [rank["short"] for rank in ranks]
    assert [r["forwards"] for r in short] == [3, 3]  # rank 0 holds 4 batches, rank 1 3
    assert short[0]["metrics"] == short[1]["metrics"] == {"loss": 12.0}  # 6 samples x 2
    assert short[0]["records"] == [("val_cut_short", 7, {"batches": 3})]
    message = short[0]["lines"][0]
    assert message.startswith("step 7: validation ran 3 batches on every rank, then stopped")
    assert "rank [1] had no further batch" in message
    assert "the batch that ranks [0] held was not run" in message
    assert "{1: {'bad_shard': 1}}" in message

    other = [rank["other"] for rank in ranks]
    assert [r["forwards"] for r in other] == [0, 0] and other[0]["metrics"] is None
    assert other[0]["lines"] == other[1]["lines"]
    assert other[0]["lines"][0].startswith("step 7: validation skipped, no held-out batch on "
                                           "every rank: rank [1] held other batches than "
                                           "rank 0")
