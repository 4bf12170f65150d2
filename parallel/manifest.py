"""Checkpoint manifests: every file's size and SHA-256, computed and checked in shares.

At 30B parameters a checkpoint with Adam and EMA is ~0.5 TB; one rank hashing all of it
outlives the collective timeout of the ranks waiting for it. So each rank fsyncs and
hashes its share (the files it wrote, read back from its own page cache, plus an even
share of files no rank claimed) and the digests are gathered into one manifest; checking
on resume is split the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_FILE = "manifest.json"

Entry = dict[str, int | str]  # {"bytes": size, "sha256": hex digest}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listed_files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, relative, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def durable_entries(directory: Path, names: list[str]) -> dict[str, Entry]:
    """fsync and hash ``names`` (relative to ``directory``): their manifest entries."""
    entries = {}
    for name in names:
        path = directory / name
        fsync(path)
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return entries


def balanced_shares(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Split files into ``parts`` lists of near-equal total bytes (largest first to the
    lightest part), the same on every rank for the same input."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return shares


def write_manifest(directory: Path, step: int, entries: dict[str, Entry]) -> None:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps({"step": step, "files": dict(sorted(entries.items()))},
                               indent=1))
    fsync(path)


def read_manifest(directory: Path) -> tuple[dict[str, Entry] | None, str | None]:
    """(the manifest's entries, None) or (None, why it cannot be read)."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError(f"files is a {type(files).__name__}")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return None, f"{path} is not a valid manifest ({error!r})"
    return files, None


def check_entries(directory: Path, entries: dict[str, Entry], hashes: bool = True
                  ) -> str | None:
    """None if every listed file is there with its size (and, with ``hashes``, its
    SHA-256), else the first problem."""
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, the manifest says {expected['bytes']}"
        if hashes and sha256(path) != expected["sha256"]:
            return f"{path} does not match the sha256 in its manifest"
    return None
