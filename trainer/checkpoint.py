"""Atomic single-process checkpoints: write to a temporary directory, fsync, then rename.

Layout: ``<run>/checkpoints/step_00000100/{state.pt, manifest.json}``. The manifest holds
the size and sha256 of ``state.pt``; a checkpoint whose manifest is missing or does not
match (a truncated or damaged file) is reported and skipped, and the newest one that
verifies is used. A process killed mid-save leaves only a ``.tmp-*`` directory, which is
never read and is removed by the next save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
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


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def step_dirs(self) -> list[Path]:
        """Complete-looking checkpoint directories, newest first."""
        if not self.directory.is_dir():
            return []
        dirs = [p for p in self.directory.iterdir()
                if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
        return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".tmp-*"):
            shutil.rmtree(stale)
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-{final.name}"
        tmp.mkdir()
        torch.save(state, tmp / STATE_FILE)
        _fsync(tmp / STATE_FILE)
        manifest = {"step": step, "file": STATE_FILE,
                    "bytes": (tmp / STATE_FILE).stat().st_size,
                    "sha256": _sha256(tmp / STATE_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest))
        _fsync(tmp / MANIFEST_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.directory)
        for old in self.step_dirs()[self.keep_last:]:
            shutil.rmtree(old)
        return final

    @staticmethod
    def verify(directory: Path) -> str | None:
        """None if the checkpoint is intact, else the reason it is not."""
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            return f"{manifest_path} is missing"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            return f"{manifest_path} is not valid JSON ({error})"
        state_path = directory / manifest["file"]
        if not state_path.is_file():
            return f"{state_path} is missing"
        size = state_path.stat().st_size
        if size != manifest["bytes"]:
            return f"{state_path} has {size} bytes, the manifest says {manifest['bytes']}"
        if _sha256(state_path) != manifest["sha256"]:
            return f"{state_path} does not match the sha256 in its manifest"
        return None

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint, or None when there is none (a fresh run)."""
        for directory in self.step_dirs():
            problem = self.verify(directory)
            if problem is None:
                return directory, torch.load(directory / STATE_FILE, weights_only=True)
            log.warning("skipping damaged checkpoint %s: %s", directory, problem)
        return None
