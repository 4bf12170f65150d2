"""Validation that every rank runs in step.

Every rank reads the held-out data itself and runs the same batches (a sharded model needs
all its ranks in each forward). A read error on one rank (a val shard it could not open,
or one that broke off) leaves that rank with fewer or other batches than the rest: it
would leave validation while the others wait in a collective of their next forward, and
the job would hang until the process-group timeout. So before each batch the ranks
compare what they hold (one small all-gather), and all stop at the first batch that any
rank lacks or holds differently; the validation counts what it ran and says who stopped
it and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from parallel.mesh import ParallelContext


def batch_identity(batch: dict[str, Any]) -> tuple[str, ...]:
    """What two ranks compare: the batch's sample keys (captions for data without keys)."""
    return tuple(batch.get("key") or batch["caption"])


class AgreedBatches:
    """This rank's held-out `batches`, yielded only while every rank holds the same next
    batch. Agreeing is a collective, so it runs on construction (for the first batch) and
    at each later ``next``, on every rank alike: ranks that stop together iterate the same
    number of times. After iteration ``ran`` counts the batches yielded and ``stopped_by``
    says which ranks ended it early and why (None when all ran out together)."""

    def __init__(self, batches: Iterable[dict[str, Any]], ctx: ParallelContext):
        self.batches, self.ctx = batches, ctx
        self.local = iter(batches)
        self.ran, self.stopped_by = 0, None
        self.upcoming = self.agree()

    def __bool__(self) -> bool:
        """Whether every rank holds a first batch."""
        return self.upcoming is not None

    def agree(self) -> dict[str, Any] | None:
        """Every rank's next batch, if they are one and the same; else None on every rank."""
        batch = next(self.local, None)
        mine = None if batch is None else batch_identity(batch)
        views = self.ctx.gather_objects((mine, dict(getattr(self.batches, "skipped", {}))))
        held = [identity for identity, _ in views]
        if all(identity == held[0] for identity in held[1:]):
            return batch  # None when all ran out together: the normal end
        lacking = [rank for rank, identity in enumerate(held) if identity is None]
        reference = next(identity for identity in held if identity is not None)
        other = [rank for rank, identity in enumerate(held)
                 if identity is not None and identity != reference]
        having = [rank for rank, identity in enumerate(held) if identity is not None]
        reasons = [f"rank{'s' if len(lacking) > 1 else ''} {lacking} had no further batch"
                   ] if lacking else []
        reasons += [f"rank{'s' if len(other) > 1 else ''} {other} held other batches than "
                    f"rank {held.index(reference)}"] if other else []
        skipped = {rank: counts for rank, (_, counts) in enumerate(views) if counts}
        self.stopped_by = (f"{'; '.join(reasons)}; the batch that ranks {having} held was "
                           f"not run (held-out samples skipped, by rank: {skipped or 'none'})")
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.upcoming is not None:
            batch, self.upcoming = self.upcoming, None
            self.ran += 1
            yield batch
            self.upcoming = self.agree()


def validate_in_step(task, model, val_batches: Callable[[], Iterable[dict[str, Any]]],
                     ctx: ParallelContext, step: int, monitor) -> dict[str, float] | None:
    """``task.validate`` on the held-out batches every rank holds alike; None, written to
    the log, when the ranks share no first batch (this validation is skipped)."""
    batches = AgreedBatches(val_batches(), ctx)
    if not batches:
        monitor.write(f"step {step}: validation skipped, no held-out batch on every rank: "
                      f"{batches.stopped_by or 'the held-out data gave none'}")
        return None
    metrics = task.validate(model, batches)
    if batches.stopped_by is not None:
        monitor.record("val_cut_short", step, batches=batches.ran)
        monitor.write(f"step {step}: validation ran {batches.ran} batches on every rank, "
                      f"then stopped: {batches.stopped_by}")
    return metrics
