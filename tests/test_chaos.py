"""Chaos through the real torchrun CLI (see tests/chaos.py): a 4-process run SIGKILLed on
rank 0 while it saves a checkpoint, restarted with the same command, loses no checkpoint,
its surviving ranks exit by themselves, and it ends bit for bit where an uninterrupted run
does. Kills mid-step and at start-up too, several per run, with a seed of your choice:
``make chaos`` (each launch of 4 processes costs ~25 s of CPU, too much for the suite)."""

import pytest

from tests.chaos import chaos

pytestmark = pytest.mark.slow


def test_sigkilled_ranks_lose_no_checkpoint_and_the_restarted_run_is_bitwise(tmp_path):
    # seed 23 draws rank 0 (the publisher) for the mid-checkpoint kill
    chaos(tmp_path, ["checkpoint"], seed=23, steps=8)
