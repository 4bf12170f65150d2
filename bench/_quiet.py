"""Waiting until no other process uses the cores, so a CPU bench times itself, not its
neighbours (a training run, pytest, another bench)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def cpu_ticks() -> dict[int, int]:
    """utime + stime (clock ticks) of every process, from /proc (empty where there is none)."""
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:  # the process ended while we looked
            continue
        ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return ticks


def busy_processes(window_s: float = 2.0, min_cores: float = 0.2) -> list[str]:
    """Other processes that used more than ``min_cores`` of CPU over a short window.

    Any such job (a training run, pytest, another bench) takes cores from us, so this
    looks at CPU use rather than at a list of names."""
    before = cpu_ticks()
    time.sleep(window_s)
    after = cpu_ticks()
    per_second = os.sysconf("SC_CLK_TCK") * window_s
    busy = []
    for pid, ticks in after.items():
        if pid != os.getpid() and (ticks - before.get(pid, ticks)) / per_second > min_cores:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            busy.append(f"{pid} {cmd[:80].strip()}")
    return busy


def wait_for_quiet(deadline: float, poll_s: float = 30) -> float:
    """Wait (until ``deadline``, a time.monotonic()) while another process uses the cores.

    Returns the seconds waited."""
    began = time.monotonic()
    while True:
        busy = busy_processes()
        if not busy or time.monotonic() > deadline:
            if busy:
                print(f"warning: still busy: {busy}; timings may be noisy", file=sys.stderr)
            return time.monotonic() - began
        print(f"waiting for {busy} to finish ...", file=sys.stderr, flush=True)
        time.sleep(poll_s)
