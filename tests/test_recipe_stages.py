"""Movie Gen's staged recipe as experiments: the 30B stages carry the paper's numbers and
fit their mesh and tables; the tiny twins chain through the real CLI (each stage starts
from the previous one, and the 48 px stage grows the spatial position tables); shard
positions resume with larger batches (how a batch ramp is run)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_train, python_cmd
from tests.test_shards import clips, grid, keys_of, make_shards  # noqa: F401 (fixture)
from tests.test_train_e2e import QUIET, run, train_losses
from trainer.config import LRSchedule
from trainer.start_checks import check_latent_fits, check_parallel_fits

PATHS = ["data.shards=videos.tar", "data.val_shards=val.tar", "text.encoders.ul2.path=ul2",
         "text.encoders.byt5.path=byt5", "text.encoders.clip.path=clip"]


@pytest.mark.parametrize("stage, batch, lr, steps, schedule, source, gpus, dp", [
    ("t2i_256", 9216, 1e-4, 210_000, LRSchedule.constant, None, 6144, 1536),
    ("joint_256", 1536, 6e-5, 185_000, LRSchedule.constant, "t2i_256", 6144, 768),
    ("joint_768", 1536, 6e-5, 74_500, LRSchedule.plateau, "joint_256", 6144, 768),
    ("quality_tune", 64, 1e-5, 15_000, LRSchedule.cosine, "joint_768", 256, 32),
])
def test_30b_stages_carry_the_papers_numbers_and_fit(tmp_path, stage, batch, lr, steps,
                                                     schedule, source, gpus, dp):
    tae = tmp_path / "tae.safetensors"
    tae.touch()  # only checked to exist; the TAE below is built on the meta device
    cfg = compose_train([f"experiment=movie_gen_{stage}", *PATHS, "data.image_shards=img.tar",
                         f"autoencoder.checkpoint={tae}"])
    assert (cfg.model.depth, cfg.model.width, cfg.parallel.tp) == (48, 6144, 4)
    assert (cfg.recipe.batch_size, cfg.recipe.lr, cfg.trainer.max_steps) == (batch, lr, steps)
    assert cfg.recipe.schedule is schedule
    assert cfg.trainer.init_from == (source and f"runs/movie_gen_{source}")
    assert check_parallel_fits(cfg, gpus).dp == dp
    # the per-rank bucket batches make the global batch the config names
    per_rank = cfg.data.image_batch_size if stage == "t2i_256" else cfg.data.batch_sizes[0]
    assert per_rank * dp == batch
    with torch.device("meta"):
        autoencoder = instantiate(cfg.autoencoder)
    latent = check_latent_fits(cfg, autoencoder)  # every bucket fits the position tables
    assert latent[2] // 2 == cfg.model.max_patches_h == (16 if "256" in stage else 48)
    if stage == "joint_768":
        assert (cfg.recipe.plateau.factor, cfg.recipe.plateau.min_lr) == (0.5, 1e-5)
    if stage == "quality_tune":
        assert (cfg.recipe.noise_offset, cfg.recipe.step_cap) == (0.1, 15_000)
        assert cfg.recipe.early_stop.patience > 0


SHRINK = ["model.depth=1", "model.width=64", "model.heads=4", "model.ffn_dim=128",
          "text.encoders.byte.dim=64", "text.encoders.byte.depth=1",
          "text.encoders.byte.ffn_dim=128", "recipe.batch_size=4", "data.val_samples=4",
          "trainer.max_steps=2", "trainer.val_every=2", "trainer.val_batches=1",
          "trainer.ckpt_every=2", "data.judge_prompts=0", "trainer.progress=false", *QUIET]


def stage_cmd(run_dir, stage, *overrides):
    return python_cmd("trainer.train", f"hydra.run.dir={run_dir}",
                      f"experiment=movie_gen_{stage}_tiny", *SHRINK, *overrides)


def test_tiny_stages_chain_through_the_cli_and_grow_the_tables(tmp_path):
    t2i, joint, high = tmp_path / "t2i", tmp_path / "joint", tmp_path / "high"
    result = run(stage_cmd(t2i, "t2i_256"))
    assert "at most 64 video tokens per sample" in result.stdout  # 1 frame, 8 x 8 patches
    result = run(stage_cmd(joint, "joint_256", f"trainer.init_from={t2i}"))
    assert f"initialised from {t2i}/checkpoints/step_00000002 (EMA weights)" in result.stdout
    assert "grown" not in result.stdout and "512 video tokens" in result.stdout
    result = run(stage_cmd(high, "joint_768", f"trainer.init_from={joint}"))
    assert f"initialised from {joint}/checkpoints/step_00000002" in result.stdout
    for axis in "hw":
        assert f"dit.pos_embed.{axis} grown (8, 64) -> (12, 64)" in result.stdout
    assert "576 video tokens" in result.stdout  # 4 frames x 12 x 12 patches at 48 px
    assert sorted(train_losses(high)) == [1, 2]


def test_shard_positions_resume_with_larger_batches(tmp_path, clips):  # noqa: F811
    """A batch ramp: the run stops, then resumes with doubled bucket batch sizes; every
    sample of the epoch still comes exactly once."""
    from data.shards import ShardBatches, VideoShards

    pattern = make_shards(tmp_path, clips)
    small = ShardBatches(VideoShards(pattern, grid(), 8.0, seed=3, epochs=1))
    head = keys_of(small, 2)
    large = ShardBatches(VideoShards(pattern, grid(batch_sizes=[4, 4], image_batch_size=4),
                                     8.0, seed=3, epochs=1))
    large.load_state_dict(small.state_dict())
    tail = [batch["key"] for batch in large]
    keys = head + [key for batch in tail for key in batch]
    assert sorted(keys) == sorted(f"s{s}_{i}" for s in range(4) for i in range(3))
    assert max(len(batch) for batch in tail) == 4
