"""Opening a shard source for reading: a local path, ``file:``, ``pipe:CMD`` or an http(s)
URL (other schemes, e.g. ``gs:``, go to webdataset's ``gopen``).

``pipe:CMD`` runs CMD through the shell: it is configuration, written by whoever starts
the job. An http(s) URL is data (shard lists are generated, URLs come from manifests), so
it never reaches a shell: curl gets it as one argument, with its URL globbing off, and
``;``, ``$(...)``, quotes, ``[]`` and ``{}`` stay characters of the URL.

A command that produces no byte for ``stall_s`` seconds raises ShardStalled: a hung
``pipe:`` (a mount that stopped answering, a server that accepts and never sends) would
otherwise block its DataLoader worker for ever. The command's process group is killed
when the stream closes early, and an exit status other than 0 at the end of its output
is an OSError: the shard was cut short.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
from typing import BinaryIO

import webdataset as wds

DEFAULT_STALL_S = 300.0  # data.pipe_stall_s
CURL = ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2",
        "--fail", "--silent", "--location", "--globoff"]


class ShardStalled(OSError):
    """A shard's command produced no byte for the stall timeout."""


class CommandOutput(io.RawIOBase):
    """The stdout of a command, read with a stall timeout (see the module docstring)."""

    def __init__(self, command: str | list[str], source: str, stall_s: float):
        self.source, self.stall_s = source, stall_s
        # its own session: a stall kills the shell and whatever it started, together
        self.process = subprocess.Popen(command, shell=isinstance(command, str),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        bufsize=0, start_new_session=True)
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.process.stdout], [], [], self.stall_s)
        if not ready:
            raise ShardStalled(f"{self.source} produced no byte for {self.stall_s:g} s "
                               f"(data.pipe_stall_s={self.stall_s:g}); abandoned")
        count = self.process.stdout.readinto(buffer)
        if count == 0 and not self.ended:
            self.ended = True
            try:
                status = self.process.wait(timeout=self.stall_s)
            except subprocess.TimeoutExpired:
                raise ShardStalled(f"{self.source} closed its output but did not exit "
                                   f"within {self.stall_s:g} s (data.pipe_stall_s)") from None
            if status != 0:
                raise OSError(f"{self.source} exited with status {status} (its output is "
                              f"cut short or missing)")
        return count

    def close(self) -> None:
        if not self.closed:
            if self.process.poll() is None:  # stopped before the end, or stalled
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.stdout.close()
            self.process.wait()
        super().close()


def open_source(url: str, stall_s: float = DEFAULT_STALL_S) -> BinaryIO:
    """A readable binary stream of the shard at `url` (a path, file:, pipe:, http(s) URL)."""
    if url.startswith("pipe:"):
        command: str | list[str] = url[len("pipe:"):]
    elif url.startswith(("http://", "https://")):
        command = [*CURL, url]
    else:
        return wds.gopen(url)
    # unbuffered: a BufferedReader would wait for a whole buffer, past the bytes tarfile needs
    return CommandOutput(command, url, stall_s)
