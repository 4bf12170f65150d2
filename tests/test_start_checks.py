"""Settings that pass each group's schema but would crash a run at its first validation,
sample or checkpoint are refused at start with a config error naming the key."""

from __future__ import annotations

import pytest

from data.shards import write_shard
from tests.conftest import compose_train
from trainer.build import single_process
from trainer.config import ConfigError
from trainer.data import build_train_batches, build_val_batches
from trainer.start_checks import check_start


def test_zero_validation_batches_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.val_batches=0 must be >= 1"):
        compose_train(["trainer.val_batches=0"])


@pytest.mark.parametrize("overrides, message", [
    (["experiment=tae_tiny", "data.height=34", "data.width=33"], None),  # odd width: fine
    (["experiment=tae_tiny", "data.height=33"],
     "data.height=33 and data.width=32: validation writes inputs and reconstructions as "
     "H.264 videos, which need an even height and width"),
    (["experiment=tae_tiny", "data.height=8", "data.width=8"],
     "data.height=8 and data.width=8: validation measures SSIM with an 11-pixel window"),
    (["experiment=tae_tiny", "data.height=33", "data.val_samples=0"], None),  # no video
    (["trainer.sample_prompts=[a]", "data.width=30"], None),
    (["trainer.sample_prompts=[a]", "autoencoder.space_to_depth=1", "model.in_channels=3",
      "model.patch_w=1", "data.width=31"],
     "data.height=32 and data.width=31: trainer.sample_prompts are sampled and written as "
     "H.264 videos"),
    (["trainer.device=banana"], "trainer.device='banana' is not a device"),
])
def test_sizes_the_run_cannot_write_or_measure(overrides, message):
    cfg = compose_train(overrides)
    if message is None:
        check_start(cfg)
        return
    with pytest.raises(ConfigError) as error:
        check_start(cfg)
    assert message in str(error.value)


def test_validation_shards_without_a_usable_sample_are_refused(tmp_path):
    write_shard(tmp_path / "val.tar", [{"__key__": "a", "txt": "no media"},
                                       {"__key__": "b", "mp4": b"\x00" * 64, "txt": "b"}])
    cfg = compose_train(["data=webdataset", f"data.shards={tmp_path}/val.tar",
                         f"data.val_shards={tmp_path}/val.tar"])
    with pytest.raises(ConfigError, match=r"data.val_shards=.*val.tar.* holds no usable "
                                          r"sample \(skipped: .*no_media.*1"):
        build_val_batches(cfg)


def test_too_little_data_for_one_batch_is_refused():
    with pytest.raises(ConfigError, match=r"data.val_samples=3 .* recipe.batch_size=8"):
        build_val_batches(compose_train(["data.val_samples=3", "recipe.batch_size=8"]))
    with pytest.raises(ConfigError, match=r"data.num_samples=5 .* recipe.batch_size=8"):
        build_train_batches(compose_train(["data.num_samples=5", "recipe.batch_size=8"]),
                            None, single_process("cpu"))


def test_a_key_added_with_plus_to_a_schema_is_refused():
    # Hydra adds it; turning the config into dataclasses would drop it without a word
    with pytest.raises(ConfigError, match=r"model.dept is not a setting: model has no key "
                                          r"'dept' .*check the spelling"):
        compose_train(["+model.dept=3"])
