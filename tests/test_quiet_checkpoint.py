"""Clean logs: a single-process run saves and loads its checkpoints without torch's
"torch.distributed is disabled ... assuming the intent is to save in a single process"
warning (it asks the user to do nothing); every other warning still reaches the user."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from parallel.checkpoint import load_training_state, save_training_state
from parallel.quiet import SINGLE_PROCESS_CHECKPOINT, single_process_checkpoint_io
from parallel.weights import CheckpointWeights


def test_torch_still_says_it_and_the_filter_matches_its_words(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "raw"))
        dcp.load({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "raw"))
    said = [str(w.message) for w in caught if "single process" in str(w.message)]
    assert len(said) == 2
    assert all(SINGLE_PROCESS_CHECKPOINT.search(message) for message in said)


def test_single_process_save_and_load_are_quiet(tmp_path, recwarn):
    warnings.simplefilter("always")
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    save_training_state(tmp_path, model, optimizer, {}, {"step": 1})
    state = load_training_state(tmp_path, nn.Linear(3, 2), None, {})
    assert state == {"step": 1}
    # trainer.init_from and trainer.average read whole tensors one at a time
    weights = CheckpointWeights(tmp_path, ema=False)
    assert torch.equal(weights.read("weight"), model.weight.detach())
    assert [str(w.message) for w in recwarn] == []


def test_only_that_warning_is_silenced(recwarn):
    warnings.simplefilter("always")
    with single_process_checkpoint_io():
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming "
                      "the intent is to save in a single process.", UserWarning, stacklevel=1)
        warnings.warn("checkpoint shard 3 is stale: delete it", UserWarning, stacklevel=1)
        warnings.warn("assuming the intent is to save in a single process.", FutureWarning,
                      stacklevel=1)
    assert [str(w.message) for w in recwarn] == [
        "checkpoint shard 3 is stale: delete it",
        "assuming the intent is to save in a single process."]
