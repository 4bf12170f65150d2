"""One live launch per run directory.

Two launches on one ``runs/<name>`` write, prune and rename each other's checkpoints
(each deletes the other's temporary step folders). The first launch holds an advisory
POSIX record lock (``fcntl.lockf``) on ``<run_dir>/.lock`` for its lifetime; a second
launch is refused with the holder's host, pid and job id. The kernel drops the lock when
the holder dies however it dies (SIGKILL, node loss on a shared filesystem with locking),
so a requeued or restarted job takes it again with no stale lock to clean up. Not
``flock``: its lock belongs to the open file, which forked data-loader workers share, so
a SIGKILLed launch's workers kept the run locked while they wound down.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

LOCK_NAME = ".lock"
# Locks this process holds, by path: a train() that raised may still hold its lock through
# the traceback, so a later train() in the same process (a test, a notebook) takes it over,
# and closing a second handle on the file would drop a POSIX lock the process holds.
_HELD: dict[Path, object] = {}


class RunDirInUse(RuntimeError):
    """Another live launch holds this run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on host {info['host']} (job {info['job']}, since "
                f"{info['since']})")
    except (OSError, ValueError, KeyError):
        return "another process (its holder record is unreadable)"


class RunDirLock:
    """Hold ``<run_dir>/.lock`` until ``release`` or process exit.

    ``acquire`` is collective under torch.distributed: rank 0 takes the lock and every
    rank raises ``RunDirInUse`` together, so no rank of a refused launch is left waiting
    in a collective.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._file = None

    def _try_lock(self) -> str | None:
        """Take the lock in this process; None on success, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            self._file = _HELD[key]
            return None
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES: held by another process
            handle.close()
            return _holder(self.path)
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "job": os.environ.get("SLURM_JOB_ID", "-"),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
        handle.flush()
        self._file = _HELD[key] = handle
        return None

    def acquire(self, is_main: bool = True) -> RunDirLock:
        holder = self._try_lock() if is_main else None
        if dist.is_available() and dist.is_initialized():
            shared = [holder]
            dist.broadcast_object_list(shared, src=0)
            holder = shared[0]
        if holder is not None:
            raise RunDirInUse(
                f"run directory {self.path.parent} is in use by {holder}; wait for that "
                f"launch to end or choose another run_name=...")
        return self

    def release(self) -> None:
        if self._file is not None and _HELD.get(self.path.resolve()) is self._file:
            del _HELD[self.path.resolve()]
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
        self._file = None
