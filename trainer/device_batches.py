"""Training batches on the training device, the next one copied while this one trains.

On CUDA every tensor of a batch (nested in dicts, lists and tuples) is pinned and copied
with ``non_blocking`` on a side stream, one batch ahead of the step; the step's stream
waits for that copy before using it. On any other device the batches pass through as the
loader made them (no pinning, no look-ahead: there is no copy to overlap).

Reading ahead moves the loader past the batch being trained, so the state saved for
resume is the loader's state (and skip counts) as of the batch last handed out, recorded
when that batch was read: a checkpoint holds exactly the batches consumed, as without
the look-ahead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def record_stream(tensor: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
    tensor.record_stream(stream)
    return tensor


def one_ahead(batches: Iterator[Any], snapshot: Callable[[], Any]
              ) -> Iterator[tuple[Any, Any]]:
    """(batch, ``snapshot()`` taken right after reading it), reading the next batch from
    ``batches`` before handing out the current one."""
    pending = next(batches, None)
    if pending is None:
        return
    pending_state = snapshot()
    for upcoming in batches:
        upcoming_state = snapshot()
        yield pending, pending_state
        pending, pending_state = upcoming, upcoming_state
    yield pending, pending_state


class DeviceBatches:
    """Iterates a resumable loader (``state_dict``/``load_state_dict``, optionally
    ``skipped``) with its batches on ``device``; checkpoint this, not the loader."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = batches, torch.device(device)
        self.ahead = self.device.type == "cuda"
        self._state: dict | None = None  # the loader's, as of the batch handed out
        self._skipped: Counter | None = None

    def _snapshot(self) -> tuple[dict, Counter]:
        return self.batches.state_dict(), Counter(getattr(self.batches, "skipped", {}))

    def _pinned_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        # from pageable memory a non_blocking copy would be synchronous
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        return pinned.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Any]:
        if not self.ahead:
            self._state = self._skipped = None  # the loader's own state is current
            yield from self.batches
            return
        stream = torch.cuda.Stream(self.device)

        def copied(source: Iterator[Any]) -> Iterator[tuple[Any, torch.cuda.Event]]:
            for batch in source:
                with torch.cuda.stream(stream):
                    batch = map_tensors(batch, self._pinned_copy)
                    done = torch.cuda.Event()
                    done.record(stream)
                yield batch, done

        for (batch, done), state in one_ahead(copied(iter(self.batches)), self._snapshot):
            self._state, self._skipped = state
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)  # this batch's copy only, not the next one's
            # the step's stream uses memory allocated on the side stream: the allocator
            # must not reuse it before the step is done with it
            map_tensors(batch, partial(record_stream, stream=current))
            yield batch

    @property
    def skipped(self) -> Counter:
        """Samples skipped by reason, as of the batch last handed out."""
        if self._skipped is not None:
            return self._skipped
        return Counter(getattr(self.batches, "skipped", {}))

    def state_dict(self) -> dict:
        return self._state if self._state is not None else self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
        self._state = self._skipped = None
