import pytest
import torch
from torch.utils.data import Dataset

from data.loader import ShuffledBatches


class Keys(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"video": torch.zeros(1), "caption": f"c{i}", "fps": 8.0, "key": f"k{i:03d}"}


def keys(batches, count):
    it = iter(batches)
    return [k for _ in range(count) for k in next(it)["key"]]


def test_epoch_is_a_permutation_and_epochs_differ():
    loader = ShuffledBatches(Keys(40), batch_size=4, seed=3)
    first, second = keys(loader, 10), keys(loader, 10)
    assert sorted(first) == sorted(f"k{i:03d}" for i in range(40))
    assert sorted(second) == sorted(first) and second != first


def test_resume_continues_exactly():
    reference = keys(ShuffledBatches(Keys(30), batch_size=4, seed=1), 17)
    loader = ShuffledBatches(Keys(30), batch_size=4, seed=1)
    head = keys(loader, 9)
    resumed = ShuffledBatches(Keys(30), batch_size=4, seed=1)
    resumed.load_state_dict(loader.state_dict())
    assert head + keys(resumed, 8) == reference


def test_data_parallel_ranks_are_disjoint_and_complete():
    ranks = [keys(ShuffledBatches(Keys(48), batch_size=3, seed=0, dp_rank=r, dp_size=2), 8)
             for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(f"k{i:03d}" for i in range(48))


def test_resume_at_another_dp_size_with_the_same_global_batch_is_exact():
    single = ShuffledBatches(Keys(48), batch_size=4, seed=2)
    head = keys(single, 5)
    reference = keys(ShuffledBatches(Keys(48), batch_size=4, seed=2), 11)
    halves = [ShuffledBatches(Keys(48), batch_size=2, seed=2, dp_rank=r, dp_size=2)
              for r in range(2)]
    for half in halves:
        half.load_state_dict(single.state_dict())
    steps = [keys(half, 6) for half in halves]  # 2 keys per step per rank
    merged = [k for step in range(6) for r in range(2) for k in steps[r][2 * step: 2 * step + 2]]
    assert head + merged == reference


def test_resume_with_other_global_batch_or_seed_is_refused():
    state = ShuffledBatches(Keys(40), batch_size=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="global_batch_size=4, this run has global_batch_size=6"):
        ShuffledBatches(Keys(40), batch_size=3, seed=0, dp_rank=0, dp_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0, this run has seed=1"):
        ShuffledBatches(Keys(40), batch_size=4, seed=1).load_state_dict(state)


def test_dataset_smaller_than_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ShuffledBatches(Keys(3), batch_size=4, seed=0)
