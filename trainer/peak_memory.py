"""Peak memory of a stretch of work, measured without tracemalloc (which would slow every
allocation): CUDA's allocator peak on a GPU; on a CPU, where torch keeps no allocator
statistics, the growth of the process's peak resident set (Linux resets the peak,
``VmHWM``, when 5 is written to ``/proc/self/clear_refs``). Freed heap is handed back to
the system first (glibc's ``malloc_trim``), so a measurement is not hidden by memory an
earlier one left cached. The label says which."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
MIB = 2 ** 20


@dataclass
class Peak:
    mib: float | None = None  # set when the measured block ends; None: not measurable


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M).group(1))


def _reset_resident_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _trim_heap() -> None:
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim(0)


class PeakMemory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.label = "CUDA allocator peak above the start (torch.cuda.max_memory_allocated)"
        elif STATUS.is_file() and _reset_resident_peak():
            self.label = ("CPU: growth of the process's peak resident set over its size "
                          "at the start (VmHWM reset through /proc/self/clear_refs, after "
                          "malloc_trim)")
        else:
            self.label = "not measured (no CUDA device, no resettable /proc peak)"

    @contextmanager
    def measure(self) -> Iterator[Peak]:
        peak = Peak()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield peak
            torch.cuda.synchronize()
            peak.mib = (torch.cuda.max_memory_allocated() - start) / MIB
        elif self.label.startswith("CPU"):
            _trim_heap()
            _reset_resident_peak()
            start = _status_kib("VmHWM")  # the resident set at the reset
            yield peak
            peak.mib = (_status_kib("VmHWM") - start) / 1024
        else:
            yield peak
