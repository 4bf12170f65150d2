"""Atomic checkpoint directories, written by every rank, published by rank 0.

Layout: ``<run>/checkpoints/step_00000100/`` holding whatever the writer puts there (the
trainer: a ``torch.distributed.checkpoint`` directory of sharded tensors plus
``trainer_state.pt``) and ``manifest.json`` listing every file with its size and sha256.
All ranks write into ``.tmp-step_…``; after a barrier rank 0 hashes the files, writes the
manifest and renames the directory into place, so a checkpoint either verifies completely
or is skipped. A process killed mid-save leaves only a ``.tmp-*`` directory, which is
never read and is removed by the next save. Ranks must share the file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
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

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_steps: set[int] = set()  # never rotated out (e.g. the best validation's)

    def step_dirs(self) -> list[Path]:
        """Published checkpoint directories, newest first."""
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir()
                if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
        return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Every rank calls this; ``write(tmp_dir)`` writes this rank's part."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-{final.name}"
        if _is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".tmp-*"):
                shutil.rmtree(stale)
            tmp.mkdir()
        _barrier()
        write(tmp)
        _barrier()
        if _is_main():
            files = _files(tmp)
            for path in files:
                _fsync(path)
            manifest = {"step": step, "files": {
                str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in files}}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            _fsync(tmp / MANIFEST_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.directory)
            for old in self.step_dirs()[self.keep_last:]:
                if int(old.name[5:]) not in self.keep_steps:
                    shutil.rmtree(old)
        _barrier()
        return final

    @staticmethod
    def verify(directory: Path) -> str | None:
        """None if the checkpoint is intact, else the reason it is not."""
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            return f"{manifest_path} is missing"
        try:
            listed = json.loads(manifest_path.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            return f"{manifest_path} is not a valid manifest ({error!r})"
        for name, expected in listed.items():
            path = directory / name
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{path} has {size} bytes, the manifest says {expected['bytes']}"
            if _sha256(path) != expected["sha256"]:
                return f"{path} does not match the sha256 in its manifest"
        return None

    def latest(self) -> Path | None:
        """The newest intact checkpoint (checked by rank 0, agreed by all), or None."""
        choice = [None]
        if _is_main():
            for directory in self.step_dirs():
                problem = self.verify(directory)
                if problem is None:
                    choice = [str(directory)]
                    break
                log.warning("skipping damaged checkpoint %s: %s", directory, problem)
        if _distributed():
            dist.broadcast_object_list(choice, src=0)
        return None if choice[0] is None else Path(choice[0])


TRAINER_STATE_FILE = "trainer_state.pt"
TENSORS_DIR = "tensors"


def save_training_state(directory: Path, model, optimizer, ema_state: dict,
                        trainer_state: dict) -> None:
    """Write model, optimizer and EMA as a DCP checkpoint (each rank its own shards, keyed
    by parameter name, so it loads at any mesh) and rank 0's small trainer state."""
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer), "ema": ema_state}
    dcp.save(state, checkpoint_id=str(directory / TENSORS_DIR))
    if _is_main():
        torch.save(trainer_state, directory / TRAINER_STATE_FILE)


def load_training_state(directory: Path, model, optimizer, ema_state: dict) -> dict:
    """Load into this rank's shards, resharding from whatever mesh saved them; returns the
    trainer state. ``optimizer=None`` loads weights (and EMA) only."""
    state = {"model": get_model_state_dict(model), "ema": ema_state}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory / TENSORS_DIR))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=True)


def save_deepspeed_state(directory: Path, engine, ema_state: dict, trainer_state: dict) -> None:
    """DeepSpeed's own layout (model, fp32 master, optimizer, scheduler; same ZeRO stage and
    dp size to reload), this rank's EMA shard and rank 0's trainer state."""
    engine.save(directory)
    rank = dist.get_rank() if _distributed() else 0
    torch.save(ema_state, directory / f"ema_rank{rank:05d}.pt")
    if _is_main():
        torch.save(trainer_state, directory / TRAINER_STATE_FILE)


def load_deepspeed_state(directory: Path, engine, ema_state: dict) -> dict:
    engine.load(directory)
    rank = dist.get_rank() if _distributed() else 0
    path = directory / f"ema_rank{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: DeepSpeed checkpoints reload only at the "
                                f"data-parallel size that wrote them")
    for name, value in torch.load(path, weights_only=True).items():
        ema_state[name].copy_(value)
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=True)


def load_deepspeed_weights(directory: Path, model, ema_state: dict) -> dict:
    """In one process, whatever ZeRO stage and dp size wrote it: full fp32 weights into a
    plain ``model`` and the per-rank EMA shards consolidated into ``ema_state`` (full
    tensors by name); returns the trainer state."""
    from parallel.deepspeed_engine import import_deepspeed

    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(directory),
                                                                   tag="deepspeed"))
    shards = [torch.load(path, weights_only=True)
              for path in sorted(directory.glob("ema_rank*.pt"))]
    for name, target in ema_state.items():
        pieces = [shard[name] for shard in shards]
        if pieces[0].shape == target.shape:  # ZeRO-1/2: every rank holds the whole tensor
            target.copy_(pieces[0])
        else:  # ZeRO-3: rank r holds the r-th padded chunk of the flattened tensor
            flat = torch.cat([piece.flatten() for piece in pieces])
            target.copy_(flat[: target.numel()].view_as(target))
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=True)
