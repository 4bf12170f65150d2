"""Chaos through the real torchrun CLI (see tests/chaos.py): a 4-process run SIGKILLed on
rank 0 while it saves a checkpoint, then on another rank mid-step, restarted with the same
command each time, loses no checkpoint and ends bit for bit where an uninterrupted run
does. More kills at random points, with a seed of your choice: ``make chaos``."""

import pytest

from tests.chaos import chaos

pytestmark = pytest.mark.slow


def test_sigkilled_ranks_lose_no_checkpoint_and_the_restarted_run_is_bitwise(tmp_path):
    # seed 23 draws rank 0 (the publisher) for the mid-checkpoint kill and rank 3 after
    chaos(tmp_path, ["checkpoint", "step"], seed=23, steps=8)
