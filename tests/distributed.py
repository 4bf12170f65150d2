"""Run a function in N gloo processes on CPU, the way torchrun would start them.

``run_distributed(fn, world_size, *args)`` spawns fresh interpreters (spawn start method),
sets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
``fn(*args)`` in each and returns the list of per-rank return values (torch-saveable).
A failing rank's traceback is raised in the test process. ``fn`` must be importable
(a module-level function).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    finished = False
    try:
        result = fn(*args)
        torch.save({"ok": result}, Path(out_dir) / f"rank{rank}.pt")
        finished = True
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            # Tear gloo down only once every rank is done: a rank that destroyed its group
            # while its peer was still finishing was seen to abort the peer on a loaded
            # machine ("terminate called without an active exception", SIGABRT).
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(fn, world_size, free_port(), out_dir, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        errors = []
        try:
            deadline = time.monotonic() + timeout
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        process.kill()
                    errors.append(f"ranks did not finish within {timeout:.0f} s (deadlock?)")
                    break
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException as error:
            errors.append(str(error))
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                errors.append(f"rank {rank} wrote no result")
                continue
            record = torch.load(path, weights_only=False)
            if "error" in record:
                errors.append(f"rank {rank}:\n{record['error']}")
            else:
                results.append(record["ok"])
        if errors:
            raise AssertionError("\n".join(errors))
        return results
