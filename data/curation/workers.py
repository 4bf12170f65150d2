"""Jobs in worker processes that know which job a dead worker held.

`multiprocessing.Pool` waits forever for the result of a worker the kernel killed (out of
memory: SIGKILL, no Python exception), and `concurrent.futures` fails every pending job
without saying whose worker died. Here each worker takes one job at a time over its own
pipe, so a worker's death is its job's failure: the other jobs go on (a new worker takes
the dead one's place), and `JobsFailed` then names every failed job and why.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait


class JobsFailed(Exception):
    """Jobs that raised or whose worker died; `failures` maps job name -> why."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        super().__init__("; ".join(f"{name}: {why}" for name, why in failures.items()))


def run_jobs(function: Callable, jobs: Sequence[tuple], names: Sequence[str], workers: int,
             setup: Callable[[], None] | None = None) -> list:
    """`function(*job)` for every job, results in job order, in up to `workers` spawned
    processes (spawned, not forked: the parent's threads, such as torch's or the caption
    encoder's, would be copied mid-flight), each calling `setup()` first; in this process
    when one worker suffices. Raises JobsFailed after the other jobs finished."""
    if workers == 1 or len(jobs) <= 1:
        return _inline(function, jobs, names)
    context = multiprocessing.get_context("spawn")
    results: list = [None] * len(jobs)
    failures: dict[str, str] = {}
    pending = deque(range(len(jobs)))
    busy: dict = {}  # parent end of a worker's pipe -> (process, index of its job)

    def start_worker():
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(theirs, function, setup), daemon=True)
        process.start()
        theirs.close()
        return ours, process

    def hand_out(conn, process):
        if pending:
            index = pending.popleft()
            conn.send(jobs[index])
            busy[conn] = (process, index)
        else:
            conn.send(None)  # no more jobs: the worker returns
            conn.close()
            process.join()

    for _ in range(min(workers, len(jobs))):
        hand_out(*start_worker())
    while busy:
        for conn in wait(list(busy)):
            process, index = busy.pop(conn)
            try:
                ok, value = conn.recv()
            except EOFError:  # the worker died without a word
                conn.close()
                process.join()
                failures[names[index]] = _death(process.exitcode)
                if pending:
                    hand_out(*start_worker())
                continue
            if ok:
                results[index] = value
            else:
                failures[names[index]] = value
            hand_out(conn, process)
    if failures:
        raise JobsFailed(failures)
    return results


def _inline(function: Callable, jobs: Sequence[tuple], names: Sequence[str]) -> list:
    results = []
    for name, job in zip(names, jobs, strict=True):
        try:
            results.append(function(*job))
        except Exception as err:
            raise JobsFailed({name: traceback.format_exc()}) from err
    return results


def _serve(conn, function: Callable, setup: Callable[[], None] | None) -> None:
    if setup is not None:
        setup()
    while (job := conn.recv()) is not None:
        try:
            reply = (True, function(*job))
        except Exception:
            reply = (False, traceback.format_exc())
        conn.send(reply)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the kernel's out-of-memory killer sends it: try fewer workers=)" \
            if -exitcode == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with status {exitcode} before finishing it"
