"""Checkpoint I/O without torch's single-process notice.

``torch.distributed.checkpoint`` warns on every save and load outside a process group
that it assumes one process. A one-process run is exactly that case, so the notice asks
nothing of the user and, printed at every checkpoint, buries the warnings that do. Only
that message (as a UserWarning) is silenced, and only around our own save and load.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# torch's words (2.6 to 2.13): "torch.distributed is [disabled, ]unavailable or
# uninitialized, assuming the intent is to save|load in a single process."
SINGLE_PROCESS_CHECKPOINT = re.compile(
    r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent "
    r"is to (save|load) in a single process")


@contextmanager
def single_process_checkpoint_io() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_CHECKPOINT.pattern,
                                category=UserWarning)
        yield
