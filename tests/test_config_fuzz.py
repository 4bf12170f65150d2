"""Config fuzz: a seeded generator of invalid overrides (wrong types, zero and negative
sizes, out-of-range values, unknown keys and options, incompatible pairs across groups),
each run in-process the way ``python -m trainer.train`` runs it: Hydra's override parser
and composition, the schema and range checks, then ``train`` itself. Every one must end
in a ``ConfigError`` (printed as a one-line ``config error:`` naming an overridden key)
or in Hydra's/OmegaConf's own key or type error; none may start training or fail deeper
in the code."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from data.shards import write_shard
from tests.test_shards import clip
from trainer.config import ConfigError, register_configs, to_train_config
from trainer.run_config import CONF_DIR
from trainer.train import train

QUICK = ["trainer.max_steps=1", "trainer.val_batches=1", "trainer.sample_steps=2",
         "trainer.wandb.mode=disabled", "trainer.progress=false"]
SMALL_DIT = ["model.depth=1", "model.width=32", "model.heads=2", "model.ffn_dim=64",
             "model=dit_tiny", "text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
             "text.encoders.byte.ffn_dim=64"]
T2V = [*SMALL_DIT, "data.frames=2", "data.height=8", "data.width=8", "data.num_samples=16",
       "data.val_samples=4", "data.judge_prompts=0", "recipe.batch_size=2",
       "trainer.sample_prompts=[a]", *QUICK]
TAE = ["experiment=tae_tiny", "data.frames=4", "data.height=16", "data.width=16",
       "data.num_samples=8", "data.val_samples=2", "data.judge_prompts=0",
       "recipe.batch_size=2", *QUICK]
SHARD = "SHARD"  # replaced by the path of a real one-clip shard
SHARDS = ["data=webdataset", f"data.shards={SHARD}", "data.sizes=[[16,16]]",
          "data.durations=[4]", "data.batch_sizes=[1]", "data.image_batch_size=1",
          "data.fps=8", "data.num_workers=0", *SMALL_DIT, "trainer.sample_prompts=[]",
          *QUICK]
BASES = {"t2v": T2V, "tae": TAE, "shards": SHARDS}

# Sizes where 0 and any negative value are wrong, per base config.
SIZES = {
    "t2v": ["model.width", "model.depth", "model.heads", "model.ffn_dim", "model.in_channels",
            "model.patch_t", "model.patch_h", "model.patch_w", "model.max_patches_t",
            "model.max_patches_h", "model.max_patches_w", "model.time_freq_dim",
            "model.rope_theta", "autoencoder.space_to_depth", "text.encoders.byte.dim",
            "text.encoders.byte.heads", "text.encoders.byte.ffn_dim",
            "text.encoders.byte.max_length", "data.num_samples", "data.frames",
            "data.height", "data.width", "data.fps", "recipe.batch_size", "recipe.lr",
            "recipe.t_std", "recipe.plateau.patience", "recipe.plateau.factor",
            "recipe.step_cap", "trainer.max_steps", "trainer.log_every", "trainer.val_every",
            "trainer.val_batches", "trainer.sample_every", "trainer.sample_steps",
            "trainer.judge_steps", "trainer.ckpt_every", "trainer.keep_last",
            "trainer.max_nonfinite_steps", "parallel.dp_replicate", "parallel.cp",
            "parallel.tp", "parallel.checkpoint_every"],
    "tae": ["autoencoder.in_channels", "autoencoder.base_channels",
            "autoencoder.latent_channels", "autoencoder.temporal_compression",
            "autoencoder.spatial_compression", "autoencoder.attention_heads",
            "autoencoder.norm_groups", "autoencoder.latent_scale", "autoencoder.tile_frames",
            "autoencoder.spatial_tile_size", "recipe.disc_channels", "recipe.disc_layers"],
    "shards": ["data.fps", "data.image_batch_size", "data.prefetch_factor",
               "data.image_ratio"],
}
# Where 0 is allowed (it turns something off) but a negative value is wrong.
NON_NEGATIVE = {
    "t2v": ["data.val_samples", "data.judge_prompts", "recipe.warmup_steps",
            "recipe.weight_decay", "recipe.eps", "recipe.grad_clip", "recipe.min_lr_ratio",
            "recipe.ema_decay", "recipe.caption_dropout", "recipe.sigma_min",
            "recipe.noise_offset", "recipe.pixel_loss.weight", "recipe.pixel_loss.frames",
            "recipe.plateau.min_lr", "recipe.plateau.threshold", "recipe.early_stop.patience",
            "recipe.early_stop.min_delta"],
    "tae": ["autoencoder.decode_overlap_frames", "autoencoder.spatial_tile_overlap",
            "recipe.loss.l1_weight", "recipe.loss.kl_weight", "recipe.loss.opl_weight",
            "recipe.loss.disc_weight", "recipe.loss.disc_start"],
    "shards": ["data.num_workers"],
}


@dataclass
class Case:
    base: str
    overrides: list[str]
    named: list[str]  # a ConfigError must name at least one of these

    def __str__(self) -> str:
        return f"{self.base}: {' '.join(self.overrides)}"


def case(base: str, *overrides: str, named: list[str] | None = None) -> Case:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return Case(base, list(overrides), named or keys)


# how a shape that does not fit the autoencoder and the DiT's patches is named
FITS = "data frames/height/width="

# Settings that are wrong only together, or only with the rest of the config.
PAIRS = [
    case("t2v", "model.width=100", "model.heads=3"),
    case("t2v", "model.heads=3"),
    case("t2v", "model.rope=true", "model.width=36", "model.heads=4"),
    case("t2v", "parallel.tp=2"),
    case("t2v", "parallel.cp=2"),
    case("t2v", "parallel.dp_shard=2"),
    case("t2v", "parallel.dp_replicate=2"),
    case("t2v", "parallel.cp=2", "parallel.cp_mode=ulysses", "model.heads=1",
         "model.width=32"),
    case("t2v", "parallel=deepspeed", "parallel.tp=2"),
    case("t2v", "parallel=deepspeed", "parallel.zero_stage=4"),
    case("t2v", "parallel=deepspeed", "parallel.zero_stage=0"),
    case("t2v", "parallel=deepspeed", "parallel.offload_params=true"),
    case("t2v", "task=tae", named=["task=tae"]),
    case("t2v", "recipe.schedule=plateau", "data.val_samples=0"),
    case("t2v", "recipe.early_stop.patience=2", "data.val_samples=0"),
    case("t2v", "recipe.step_cap=1", "trainer.max_steps=5"),
    case("t2v", "recipe.schedule=plateau", "recipe.plateau.min_lr=1.0"),
    case("t2v", "model.in_channels=16"),
    case("t2v", "data.height=10", named=[FITS]),
    case("t2v", "data.width=7", named=["data.width", FITS]),
    case("t2v", "data.frames=40", named=[FITS]),
    case("t2v", "model.max_patches_h=1"),
    case("t2v", "autoencoder=tae_tiny", named=["autoencoder.checkpoint"]),
    case("t2v", "autoencoder=tae_tiny", "autoencoder.checkpoint=/nonexistent.safetensors"),
    case("t2v", "data.val_samples=1", named=["data.val_samples", "recipe.batch_size"]),
    case("t2v", "data.num_samples=1", named=["data.num_samples", "recipe.batch_size"]),
    case("t2v", "text.encoders.byte.dim=30", "text.encoders.byte.heads=4"),
    case("t2v", "text.encoders.byte.depth=-1"),
    case("t2v", "text.encoders.byte.max_length=1"),
    case("t2v", "recipe.betas=[1.5,0.9]"),
    case("t2v", "recipe.betas=[0.9,-0.1]"),
    case("t2v", "recipe.betas=[0.9]"),
    case("t2v", "recipe.ema_decay=1.0"),
    case("t2v", "recipe.caption_dropout=1.0"),
    case("t2v", "recipe.min_lr_ratio=2"),
    case("t2v", "recipe.sigma_min=1.0"),
    case("t2v", "recipe.plateau.factor=1.5"),
    case("t2v", "recipe.pixel_loss.weight=1", "recipe.pixel_loss.crop=[3]"),
    case("t2v", "recipe.pixel_loss.weight=1", "recipe.pixel_loss.crop=[0,4]"),
    case("t2v", "trainer.device=banana"),
    case("t2v", "trainer.init_from=/nonexistent/run"),
    case("t2v", "model.position_init=bogus"),
    case("t2v", "autoencoder.space_to_depth=1", "model.in_channels=3", "model.patch_h=1",
         "model.patch_w=1", "data.height=9", named=["data.height"]),
    case("t2v", "text=movie_gen", named=["text.encoders"]),
    case("tae", "recipe.pixel_loss.weight=1"),
    case("tae", "parallel=deepspeed", named=["task=tae", "parallel.engine"]),
    case("tae", "recipe=flow_adamw", named=["task=tae", "recipe"]),
    case("tae", "autoencoder=identity", named=["task=tae", "autoencoder"]),
    case("tae", "data.height=9"),
    case("tae", "data.height=8", "data.width=8"),  # below SSIM's 11-pixel window
    case("tae", "data.width=9"),
    case("tae", "autoencoder.spatial_compression=3"),
    case("tae", "autoencoder.norm_groups=3"),
    case("tae", "autoencoder.channel_multipliers=[]"),
    case("tae", "autoencoder.channel_multipliers=[1,0]"),
    case("tae", "recipe.loss.l1_weight=0", "recipe.loss.l2_weight=0"),
    case("shards", "data.shards=/nonexistent/{000000..000003}.tar"),
    case("shards", "data.val_shards=/nonexistent/val.tar"),
    case("shards", "data.val_shards=EMPTY_SHARD", named=["data.val_shards"]),
    case("shards", "data.image_shards=/nonexistent/img.tar"),
    case("shards", "data.val_shards=''"),
    case("shards", "data.sizes=[[0,16]]"),
    case("shards", "data.sizes=[[16,16,16]]"),
    case("shards", "data.sizes=[]"),
    case("shards", "data.durations=[0]"),
    case("shards", "data.durations=[4,4]"),
    case("shards", "data.batch_sizes=[0]"),
    case("shards", "data.batch_sizes=[1,1,1]"),
    case("shards", "data.sizes=[[15,16]]", named=[FITS]),
    case("shards", "trainer.sample_prompts=[a]", "data.sizes=[[17,16]]",
         "autoencoder.space_to_depth=1", "model.in_channels=3", "model.patch_h=1",
         "model.patch_w=1", named=["data.sizes"]),
]

GARBAGE = {"IntegerNode": ["abc", "1.5", "[1,2]", "{a: 1}"],
           "FloatNode": ["abc", "[1.0]", "{a: 1}"],
           "BooleanNode": ["maybe", "[true]", "2.5"],
           "EnumNode": ["bogus", "[a]", "7"],
           "StringNode": ["[a,b]", "{a: b}"],
           "ListConfig": ["abc", "7", "{a: 1}"]}


def leaves(node: DictConfig, prefix: str = ""):
    """(dotted key, value node type) of every leaf of a composed config."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from leaves(child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", type(child).__name__


def generate(composed: dict[str, DictConfig], seed: int = 2026) -> list[Case]:
    rng = random.Random(seed)
    cases = list(PAIRS)
    for base, keys in SIZES.items():
        for key in keys:
            cases.append(case(base, f"{key}={rng.choice([0, -1, -rng.randint(2, 10_000)])}"))
    for base, keys in NON_NEGATIVE.items():
        for key in keys:
            cases.append(case(base, f"{key}=-{rng.choice([1, 0.5, 3, 1e9])}"))
    for base, cfg in composed.items():
        typed = [(key, kind) for key, kind in leaves(cfg) if kind in GARBAGE]
        for key, kind in rng.sample(typed, 20):
            cases.append(case(base, f"{key}={rng.choice(GARBAGE[kind])}"))
        for key, _ in rng.sample(typed, 6):
            group, _, leaf = key.rpartition(".")
            misspelt = f"{group}.{leaf}{rng.choice(['x', 's', '_'])}" if group else f"{leaf}x"
            cases.append(case(base, f"{misspelt}=1"))
    for override in ["+model.new_key=1", "+trainer.resume=true", "nosuchgroup=x",
                     "model=dit_huge", "experiment=nope", "recipe=nope", "model.depth",
                     "model.depth==2", "trainer.sample_prompts=[a,", "~model"]:
        cases.append(case("t2v", override))
    return cases


@pytest.fixture(scope="module")
def hydra_conf(tmp_path_factory):
    """One Hydra context for the module (initialising it per case would double the time),
    and real shards: one usable clip, and one shard with no usable sample."""
    folder = tmp_path_factory.mktemp("shards")
    good = clip(folder, "clip", 4, 16, 16)
    write_shard(folder / "good.tar", [{"__key__": "c", "mp4": good, "txt": "a clip"}])
    write_shard(folder / "empty.tar", [{"__key__": "t", "txt": "no media"}])
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        yield {SHARD: str(folder / "good.tar"), "EMPTY_SHARD": str(folder / "empty.tar")}


def overrides_of(fuzz: Case, paths: dict[str, str]) -> list[str]:
    """The base, then the fuzzed overrides (a later override wins)."""
    out = []
    for override in [*BASES[fuzz.base], *fuzz.overrides]:
        for name, path in paths.items():
            override = override.replace(name, path)
        out.append(override)
    return out


def launch(overrides: list[str], run_dir) -> None:
    """What ``python -m trainer.train`` runs, in this process."""
    train(to_train_config(compose("train", overrides=overrides)), run_dir, {})


def outcome(fuzz: Case, overrides: list[str], run_dir) -> str | None:
    """None if the launch ends as it must, else what went wrong. Hydra reports its own
    override parse, key and type errors in one line; past composition, only a ConfigError
    is printed without a traceback."""
    try:
        composed = compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException):
        return None
    try:
        train(to_train_config(composed), run_dir, {})
    except ConfigError as error:
        message = str(error)
        if "\n" in message or not any(key in message for key in fuzz.named):
            return f"config error not one line naming {fuzz.named}: {message!r}"
        return None
    except Exception as error:  # noqa: BLE001 - what the fuzz is looking for
        first = str(error).splitlines()[0] if str(error) else ""
        return f"{type(error).__name__}: {first}"
    return "accepted, and trained"


def test_every_base_config_trains(hydra_conf, tmp_path):
    """The fuzz means something only if the bases themselves are accepted."""
    for name in BASES:
        run_dir = tmp_path / name
        run_dir.mkdir()
        launch(overrides_of(Case(name, [], []), hydra_conf), run_dir)
        assert (run_dir / "checkpoints" / "step_00000001").is_dir()


def test_invalid_overrides_end_in_a_config_error(hydra_conf, tmp_path):
    composed = {name: compose("train", overrides=overrides_of(Case(name, [], []), hydra_conf))
                for name in BASES}
    cases = generate(composed)
    assert len(cases) >= 200 and len({str(c) for c in cases}) == len(cases)
    problems = []
    for index, fuzz in enumerate(cases):
        run_dir = tmp_path / str(index)
        run_dir.mkdir()
        problem = outcome(fuzz, overrides_of(fuzz, hydra_conf), run_dir)
        if problem is not None:
            problems.append(f"{fuzz}: {problem}")
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems)
