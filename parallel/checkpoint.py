"""Atomic checkpoint directories, written by every rank, published by rank 0.

Layout: ``<run>/checkpoints/step_00000100/`` holding whatever the writer puts there (the
trainer: a ``torch.distributed.checkpoint`` directory of sharded tensors plus
``trainer_state.pt``) and ``manifest.json`` listing every file with its size and sha256.
All ranks write into ``.tmp-step_…``; each rank then fsyncs and hashes its own files (and
a share of any that no writer claimed, see ``parallel.manifest``), rank 0 gathers the
digests into the manifest and renames the directory into place, so a checkpoint either
verifies completely or is skipped. A process killed mid-save leaves only a ``.tmp-*``
directory, which is never read and is removed by the next save. Ranks must share the
file system.

An asynchronous write (``dcp.async_save``) returns before the files are on disk; its
checkpoint is published by the next ``save`` or by ``wait``, once every rank's write has
completed, so a published directory is always whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parallel.manifest import (
    MANIFEST_FILE,
    balanced_shares,
    check_entries,
    durable_entries,
    fsync,
    listed_files,
    read_manifest,
    write_manifest,
)
from parallel.quiet import single_process_checkpoint_io

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_FILE", "Checkpointer"]

# What a writer returns: the files this rank wrote (None: it claims none, the
# checkpointer splits them evenly), or (asynchronous) a function that waits for its
# write to complete and then returns them.
Written = Iterable[Path] | Callable[[], Iterable[Path]] | None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _is_main() -> bool:
    return _rank() == 0


def _from_main(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_main(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
    if not _distributed():
        return [obj]
    gathered = [None] * _world() if _is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def _step_of(directory: Path) -> int:
    return int(directory.name[5:])


@dataclass
class _Pending:
    step: int
    tmp: Path
    final: Path
    written: Written


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_steps: set[int] = set()  # never rotated out (e.g. the best validation's)
        self.damaged: set[int] = set()     # steps ``latest`` found damaged
        self._pending: _Pending | None = None

    def step_dirs(self) -> list[Path]:
        """Published checkpoint directories, newest first."""
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir()
                if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
        return sorted(dirs, key=_step_of, reverse=True)

    def save(self, step: int, write: Callable[[Path], Written]) -> Path:
        """Every rank calls this; ``write(tmp_dir)`` writes this rank's part and returns
        what it wrote (see ``Written``). A synchronous write is published before this
        returns; an asynchronous one by the next ``save`` or ``wait``. Returns the
        directory the checkpoint is (or will be) published as."""
        self.wait()
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-{final.name}"
        if _is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".tmp-*"):
                shutil.rmtree(stale)
            tmp.mkdir()
        _barrier()
        self._pending = _Pending(step, tmp, final, write(tmp))
        if not callable(self._pending.written):
            self.wait()
        return final

    def wait(self) -> Path | None:
        """Publish the pending checkpoint once its write has completed on this rank (every
        rank calls this); its directory, or None if nothing was pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        written = pending.written() if callable(pending.written) else pending.written
        self._publish(pending, [str(Path(p).relative_to(pending.tmp)) for p in written or ()])
        return pending.final

    def _publish(self, pending: _Pending, own: list[str]) -> None:
        tmp = pending.tmp
        _barrier()  # every rank's files are written and closed
        claims = _to_main(own)
        shares = None
        if _is_main():
            listed = listed_files(tmp)
            claimed = {name for names in claims for name in names}
            unclaimed = {name: (tmp / name).stat().st_size
                         for name in listed if name not in claimed}
            shares = balanced_shares(unclaimed, _world())
        share = _from_main(shares)[_rank()]
        entries = _to_main(durable_entries(tmp, sorted(set(own) | set(share))))
        if _is_main():
            merged = {name: entry for part in entries for name, entry in part.items()}
            missing = set(listed) - merged.keys()
            if missing:
                raise RuntimeError(f"checkpoint files {sorted(missing)} of {tmp} were hashed "
                                   f"by no rank")
            write_manifest(tmp, pending.step, merged)
            if pending.final.exists():
                shutil.rmtree(pending.final)
            os.replace(tmp, pending.final)
            fsync(self.directory)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` intact checkpoints (and ``keep_steps``); damaged
        ones count for nothing and are removed, so a broken newer ``step_N`` can never
        push the good ones out."""
        intact = 0
        for directory in self.step_dirs():
            step = _step_of(directory)
            problem = ("it failed verification at start" if step in self.damaged
                       else self._cheap_problem(directory))
            if problem is None:
                intact += 1
                if intact <= self.keep_last:
                    continue
            if step in self.keep_steps:
                continue
            if problem is not None:
                log.warning("removing damaged checkpoint %s: %s", directory, problem)
            shutil.rmtree(directory)

    @staticmethod
    def _cheap_problem(directory: Path) -> str | None:
        """Manifest and file sizes only (no hashing): what pruning can afford."""
        entries, problem = read_manifest(directory)
        return problem or check_entries(directory, entries, hashes=False)

    @staticmethod
    def verify(directory: Path) -> str | None:
        """None if the checkpoint is intact, else the reason it is not (in one process)."""
        entries, problem = read_manifest(directory)
        return problem or check_entries(directory, entries)

    def _verify_split(self, directory: Path) -> str | None:
        """``verify`` with the hashing split over the ranks by bytes."""
        entries, problem = _from_main(read_manifest(directory) if _is_main() else None)
        if problem is not None:
            return problem
        sizes = {name: int(entry["bytes"]) for name, entry in entries.items()}
        share = balanced_shares(sizes, _world())[_rank()]
        mine = check_entries(directory, {name: entries[name] for name in share})
        problems = [mine] if not _distributed() else [None] * _world()
        if _distributed():
            dist.all_gather_object(problems, mine)
        return next((p for p in problems if p is not None), None)

    def latest(self) -> Path | None:
        """The newest intact checkpoint (every rank checks a share, all agree), or None."""
        candidates = _from_main([str(p) for p in self.step_dirs()] if _is_main() else None)
        for directory in map(Path, candidates):
            problem = self._verify_split(directory)
            if problem is None:
                return directory
            self.damaged.add(_step_of(directory))
            if _is_main():
                log.warning("skipping damaged checkpoint %s: %s", directory, problem)
        return None


TRAINER_STATE_FILE = "trainer_state.pt"
TENSORS_DIR = "tensors"


@cache
def _async_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for asynchronous saves only: DCP's background thread runs
    its planning collectives on it, never interleaved with the training step's on the
    training groups (and NCCL-only groups cannot carry them: the state is staged on CPU).
    Created by the first asynchronous save, which every rank makes."""
    return dist.new_group(backend="gloo") if _distributed() else None


def save_training_state(directory: Path, model, optimizer, ema_state: dict,
                        trainer_state: dict, asynchronous: bool = False) -> Written:
    """Write model, optimizer and EMA as a DCP checkpoint (each rank its own shards, keyed
    by parameter name, so it loads at any mesh) and rank 0's small trainer state; the
    files this rank wrote. ``asynchronous``: the tensors are copied to CPU memory now and
    written by a background thread; returns a function that waits for that write."""
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer), "ema": ema_state}
    tensors = directory / TENSORS_DIR
    with single_process_checkpoint_io():
        if asynchronous:
            future = dcp.async_save(state, checkpoint_id=str(tensors),
                                    process_group=_async_group())
        else:
            dcp.save(state, checkpoint_id=str(tensors))
    own = []
    if _is_main():
        torch.save(trainer_state, directory / TRAINER_STATE_FILE)
        own.append(directory / TRAINER_STATE_FILE)

    def written() -> list[Path]:
        # DCP's file system writer names rank r's files __r_<n>.distcp; rank 0 (its
        # coordinator) writes the .metadata
        files = sorted(tensors.glob(f"__{_rank()}_*.distcp"))
        return own + files + ([tensors / ".metadata"] if _is_main() else [])

    if asynchronous:
        return lambda: (future.result(), written())[1]
    return written()


def load_training_state(directory: Path, model, optimizer, ema_state: dict) -> dict:
    """Load into this rank's shards, resharding from whatever mesh saved them; returns the
    trainer state. ``optimizer=None`` loads weights (and EMA) only."""
    state = {"model": get_model_state_dict(model), "ema": ema_state}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with single_process_checkpoint_io():
        dcp.load(state, checkpoint_id=str(directory / TENSORS_DIR))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=True)


def load_checkpoint_weights(directory: Path, model, ema_state: dict) -> dict:
    """A checkpoint's weights (and EMA, into ``ema_state``) in one process's plain
    ``model``, whichever engine and mesh wrote it; returns the trainer state."""
    from parallel.deepspeed_engine import CHECKPOINT_TAG, load_full_weights

    if (directory / CHECKPOINT_TAG).is_dir():
        return load_full_weights(directory, model, ema_state)
    return load_training_state(directory, model, None, ema_state)
