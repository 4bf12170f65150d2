"""Reading a tar to its end, or knowing that it was not.

Python's `tarfile` ends an iteration quietly when the next header is missing, cut short or
unreadable (anywhere but at the start), so a shard truncated by a failed copy reads as a
shorter, complete one. A tar is complete when its member headers are followed by the
end-of-archive block of zeros (POSIX ustar), which `member_headers` checks.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from typing import BinaryIO

# What reading a damaged or truncated (possibly compressed) tar raises.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError)


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
