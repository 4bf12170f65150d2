"""The raw samples of one curation source: a tar shard, or a chunk of a folder of videos.

A sample is the members sharing a key (the file name up to its first dot, as webdataset
groups them). Two kinds of sample are dropped before a byte of them is read:
- `duplicate_key`: the key names members of more than one sample (``a/0001.mp4`` and
  ``b/0001.mp4``, or one name twice); which caption belongs to which video is unknown,
  so every sample of the key is dropped;
- `too_large`: a member above `max_member_bytes` (the tar header's size, the size
  uncompressed), so one huge file cannot exhaust a worker's memory.
Samples are read one at a time, so a worker holds one sample, not its shard.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from data.tars import READ_ERRORS, TarReadError, member_headers


@dataclass
class RawSample:
    """`members` ({ext: bytes}) is empty when `problem` (a drop reason) is set."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def source_identity(source: str | Mapping) -> dict:
    """What a source's pass-1 results depend on: a tar's path, size and modification
    time, or a folder chunk's files and captions with each file's size and time. A
    replaced shard or video gets a new identity, so its results are not reused."""
    if isinstance(source, str):
        stat = os.stat(source)
        return {"path": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    files = []
    for file, caption in source["items"]:
        path = os.path.join(source["folder"], file)
        stat = os.stat(path) if os.path.isfile(path) else None
        files.append([file, caption, stat and [stat.st_size, stat.st_mtime_ns]])
    return {"folder": source["folder"], "items": files}


def raw_samples(source: str | Mapping, max_member_bytes: int,
                wanted: set[str] | None = None) -> Iterator[RawSample]:
    """The samples of a tar path or folder chunk in order (only keys in `wanted` if given).

    Raises TarReadError when a tar cannot be read to its end; its headers are all read
    before the first sample, so a truncated shard fails before any is judged.
    """
    if isinstance(source, str):
        yield from _tar_samples(source, max_member_bytes, wanted)
    else:
        yield from _folder_samples(source, max_member_bytes, wanted)


def _tar_samples(path: str, limit: int, wanted: set[str] | None) -> Iterator[RawSample]:
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file) as tar:
            groups: dict[str, list[tarfile.TarInfo]] = {}
            for info in member_headers(tar, file, path):
                key, _, ext = os.path.basename(info.name).partition(".")
                if info.isfile() and key and ext:
                    groups.setdefault(key, []).append(info)
            for key, infos in groups.items():
                if wanted is not None and key not in wanted:
                    continue
                names = [(os.path.dirname(i.name), _ext(i.name), i.name, i.size) for i in infos]
                problems = _problems(key, names, limit)
                if problems:
                    yield from problems
                    continue
                yield RawSample(key, {_ext(i.name): tar.extractfile(i).read() for i in infos})
    except READ_ERRORS as err:
        raise TarReadError(f"{path}: unreadable: {err}") from err


def _ext(name: str) -> str:
    return os.path.basename(name).partition(".")[2].lower()


def _problems(key: str, members: list[tuple[str, str, str, int]], limit: int) -> list[RawSample]:
    """The drops of one key's members [(folder, ext, name, size)]: one per sample for a
    duplicate key, one for a member over the limit; [] when the sample is fine."""
    repeats = max(Counter(ext for _, ext, _, _ in members).values())
    samples = max(repeats, len({folder for folder, _, _, _ in members}))
    if samples > 1:
        listed = ", ".join(name for _, _, name, _ in members)
        return [RawSample(key, problem=f"duplicate_key: {samples} samples share key {key!r} "
                                       f"({listed})")] * samples
    big = [(name, size) for _, _, name, size in members if size > limit]
    if big:
        name, size = big[0]
        return [RawSample(key, problem=f"too_large: {name} is {size} bytes > "
                                       f"max_member_bytes={limit}")]
    return []


def _folder_samples(chunk: Mapping, limit: int, wanted: set[str] | None) -> Iterator[RawSample]:
    """Samples of `{"folder": dir, "items": [[file, caption], ...]}` (a captions JSONL).

    The key is the file's path under the folder with `/` and `.` turned into `_` (a
    shard key must not hold a dot); the json records the file. A missing file leaves a
    sample without media, which pass 1 counts as a drop.
    """
    keys = Counter(re.sub(r"[/.]", "_", file) for file, _ in chunk["items"])
    for file, caption in chunk["items"]:
        key = re.sub(r"[/.]", "_", file)
        if wanted is not None and key not in wanted:
            continue
        path = os.path.join(chunk["folder"], file)
        if keys[key] > 1:
            yield RawSample(key, problem=f"duplicate_key: {keys[key]} files of the captions "
                                         f"list map to key {key!r} (one is {file!r})")
            continue
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size > limit:
            yield RawSample(key, problem=f"too_large: {file} is {size} bytes > "
                                         f"max_member_bytes={limit}")
            continue
        problem = caption_problem(caption)
        if problem:
            yield RawSample(key, problem=problem)
            continue
        members = {"txt": caption.encode(), "json": json.dumps({"source_file": file}).encode()}
        try:
            if os.path.isfile(path):
                members[Path(file).suffix.lstrip(".").lower() or "bin"] = Path(path).read_bytes()
        except OSError as err:
            yield RawSample(key, problem=f"unreadable: {err}")
            continue
        yield RawSample(key, members)


def caption_problem(caption: object) -> str | None:
    """Why a caption cannot be used (a `bad_caption` drop reason), or None.

    A json string may hold a lone UTF-16 surrogate ("\\ud800"): valid JSON, but no UTF-8
    text, and the caption tokenizers fail on it far from where it entered.
    """
    if not isinstance(caption, str):
        return f"bad_caption: a {type(caption).__name__}, not a string"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"bad_caption: not encodable as UTF-8 ({err.reason} at character {err.start})"
    return None
