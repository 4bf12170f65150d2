"""Reading a tar to its end, or knowing that it was not; a streamed tar's samples.

Python's `tarfile` ends an iteration quietly when the next header is missing, cut short or
unreadable (anywhere but at the start), so a shard truncated by a failed copy reads as a
shorter, complete one. A tar is complete when its member headers are followed by the
end-of-archive block of zeros (POSIX ustar), which `member_headers` checks for a file and
`tar_samples` for a stream.
"""

from __future__ import annotations

import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

# What reading a damaged or truncated (possibly compressed) tar raises.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError)
WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own members, not samples


class TarReadError(Exception):
    """A tar could not be read to its end; the message names the file and why."""


def member_headers(tar: tarfile.TarFile, file: BinaryIO, name: str) -> list[tarfile.TarInfo]:
    """All member headers of `tar`, opened on `file` (read without the members' data).

    Raises TarReadError when the archive does not reach its end-of-archive block. An
    uncompressed tar is checked here; a compressed one is cut short only with its
    compressed stream, which the decompressor reports while the headers are read.
    """
    try:
        members = tar.getmembers()
        if tar.fileobj is file:  # uncompressed: the bytes after the last member are ours
            file.seek(tar.offset)
            end = file.read(tarfile.BLOCKSIZE)
            if end != bytes(tarfile.BLOCKSIZE):
                size = os.fstat(file.fileno()).st_size
                raise TarReadError(
                    f"{name}: truncated or damaged at byte {tar.offset} of {size} after "
                    f"{len(members)} members (no end-of-archive block there)")
    except READ_ERRORS as err:
        raise TarReadError(f"{name}: unreadable after {len(tar.members)} members: {err}") from err
    return members


def check_tar(path: str) -> None:
    """Raise TarReadError unless the tar at `path` can be read to its end."""
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file) as tar:
            member_headers(tar, file, path)
    except READ_ERRORS as err:
        raise TarReadError(f"{path}: unreadable: {err}") from err


class _TailRecorder:
    """Passes reads of ``stream`` through, counting its bytes and keeping the last ``keep``."""

    def __init__(self, stream: BinaryIO, keep: int):
        self.stream, self.keep = stream, keep
        self.length, self.tail = 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.length += len(data)
        self.tail = (self.tail + data)[-self.keep:]
        return data


@contextmanager
def streamed_tar(stream: BinaryIO) -> Iterator[tarfile.TarFile]:
    """``tarfile`` reading ``stream`` in order (mode ``r|*``). When the block ends without
    an error, raises tarfile.ReadError unless an uncompressed stream went on past the last
    member to an end-of-archive block (a compressed stream cut short fails in its
    decompressor instead); reads the stream to its end for that."""
    recorder = _TailRecorder(stream, 2 * tarfile.RECORDSIZE)
    with tarfile.open(fileobj=recorder, mode="r|*") as tar:
        yield tar
        if tar.fileobj.comptype != "tar":
            return
        end = tar.offset  # where the last member's data stopped
        while recorder.read(tarfile.RECORDSIZE):
            pass
        after = recorder.length - end
        if after > len(recorder.tail):
            return  # more than the kept tail follows: tarfile stopped on a zero block
        block = recorder.tail[len(recorder.tail) - after:][:tarfile.BLOCKSIZE]
        if block != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError(f"the stream ended at byte {recorder.length}, after the "
                                    f"member data ending at byte {end}, without the "
                                    f"end-of-archive block (cut short)")


def tar_samples(stream: BinaryIO, max_member_bytes: int
                ) -> Iterator[tuple[str, dict[str, bytes] | tuple[str, str]]]:
    """(key, {ext: bytes}) per sample of a streamed webdataset tar, in order: the members
    sharing a key (the name up to its first dot). A sample dropped unread comes as (key,
    (reason, detail)): ``too_large`` for a member above `max_member_bytes` (by its header),
    ``duplicate_key`` for a key with two members of one extension, or that comes again
    after other samples (the later one). Raises READ_ERRORS where the tar breaks off,
    also exactly between two members; the sample being read then is not yielded."""
    key, members, seen = None, {}, set()
    with streamed_tar(stream) as tar:
        for info in tar:
            tar.members = []  # streamed: keep no list of every header read
            base, ext = base_plus_ext(info.name)
            if not info.isreg() or base is None or WEBDATASET_META.match(info.name):
                continue
            if base != key:
                if key is not None:
                    yield key, members
                key, members = base, {}
                if base in seen:
                    members = ("duplicate_key", "the key came before, with other samples "
                                                "between")
                seen.add(base)
            ext = ext.lower()
            if isinstance(members, tuple):
                continue  # the stream passes over the unread data
            if ext in members:
                members = ("duplicate_key", f"two .{ext} members")
            elif info.size > max_member_bytes:
                members = ("too_large", f"{info.name} is {info.size} bytes > "
                                        f"data.max_member_bytes={max_member_bytes}")
            else:
                members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members
