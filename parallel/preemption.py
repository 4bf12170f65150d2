"""Preemption: a signal asks the run to checkpoint and exit so the scheduler can requeue it.

SLURM sends SIGUSR1 ahead of the time limit when the job asks for it
(``--signal=USR1@<seconds>``, see launch/slurm.sbatch) and SIGTERM when it preempts or
cancels. The handler only sets a flag: the signal lands on whichever rank it lands on, at
any point of its step, so the ranks agree on it with one all-reduce of a scalar (MAX),
and all of them stop at the same step, checkpoint together and exit with
``REQUEUE_EXIT_CODE``; the sbatch script turns that code into ``scontrol requeue``, and
the requeued job resumes from the checkpoint. The trainer takes the vote at its host
reads of the step values (every ``trainer.log_every`` steps, in the same transfer), so a
run stops at most that many steps after the signal.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL of sysexits.h ("try again later"): distinct from a crash (1), a Python
# error (1/2) or a kill (128 + signal), so the batch script requeues only this case.
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 in this process; ``agreed`` asks every rank."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def raised(self) -> torch.Tensor:
        """0-d float on the device, the same on every rank: 1 if any rank has been
        signalled, else 0 (collective, every rank calls it at the same step; not read to
        the host, so the caller can fold it into a read it makes anyway)."""
        # a fill on the device: a tensor built from host data would copy (and sync)
        raised = torch.full((), float(self.signal is not None), device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(raised, op=dist.ReduceOp.MAX)
        return raised

    def agreed(self) -> bool:
        """``raised``, read to the host."""
        return bool(self.raised().item())

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
