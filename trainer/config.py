"""Structured config schemas, registered with Hydra's ConfigStore.

Each YAML option in ``conf/<group>/`` names its schema first in its defaults list, so a
wrong key or a wrong type fails at composition with the key named. Enumerated choices are
Enums (OmegaConf rejects other values). Cross-field checks run when the composed config
is turned into these dataclasses (``__post_init__``) and in ``trainer.start_checks``;
their ``ConfigError`` messages name every value involved and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, MissingMandatoryValue, OmegaConf

from data.latent_shards import LatentDataConfig
from data.preference_shards import PreferenceDataConfig, PreferenceLatentDataConfig
from data.shards import WebDatasetConfig
from models.dit import DiTConfig
from models.pretrained_text import (
    ByT5EncoderConfig,
    CLIPEncoderConfig,
    MiniLMEncoderConfig,
    T5EncoderConfig,
)
from models.tae import TAEConfig
from models.tae_losses import TAELossConfig
from parallel.deepspeed_engine import check_dims, check_zero
from trainer.config_guards import check_known_keys, check_targets


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the keys, values and fix."""


class Precision(Enum):
    auto = "auto"  # by device: bf16 on a CUDA GPU that has it, else fp32 (trainer.precision)
    fp32 = "fp32"
    bf16 = "bf16"


class LRSchedule(Enum):
    cosine = "cosine"
    constant = "constant"
    plateau = "plateau"  # constant, cut by recipe.plateau.factor when validation stalls


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class CPMode(Enum):
    allgather_kv = "allgather_kv"
    ulysses = "ulysses"
    ring = "ring"


class Engine(Enum):
    fsdp2 = "fsdp2"
    deepspeed = "deepspeed"


class Task(Enum):
    t2v = "t2v"  # the text-conditioned DiT by flow matching on the autoencoder's latents
    tae = "tae"  # the autoencoder itself (recipe=tae_adamw)
    distill = "distill"  # a few-step student of a trained t2v teacher (recipe=distill)


class ActivationCheckpointing(Enum):
    none = "none"
    full = "full"
    every_k = "every_k"


@dataclass
class IdentityAutoencoderConfig:
    _target_: str = "models.autoencoder.IdentityAutoencoder"
    space_to_depth: int = 1


@dataclass
class ByteTextEncoderConfig:
    _target_: str = "models.text.ByteTextEncoder"
    dim: int = 128
    depth: int = 2
    heads: int = 4
    ffn_dim: int = 512
    max_length: int = 64
    trainable: bool = True
    shard: bool = True  # when frozen: FSDP-sharded (true) or whole on every rank (false)
    positions: str = "absolute"  # "absolute" (a table) or "rope" (relative, as T5's are)


@dataclass
class TextConfig:
    # name -> encoder node with a _target_; each YAML option pulls in its encoders' schemas
    encoders: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyntheticDataConfig:
    num_samples: int = 50_000
    val_samples: int = 64
    frames: int = 8
    height: int = 32
    width: int = 32
    fps: float = 8.0
    seed: int = 0
    # At each validation of a text-to-video run, sample the captions of this many held-out
    # clips (trainer.judge_steps Euler steps) and log how often data.judges sees what they
    # name: val/colour_match, val/shape_match, val/direction_match, val/speed_match.
    judge_prompts: int = 0
    # loader processes that build and collate the training batches (0: the training
    # process builds them); the order and the resume position do not depend on it
    num_workers: int = 2
    # keys of this data option a resumed run may change (trainer.resume_settings): here the
    # loader workers, which only decide where clips are built
    resumable: ClassVar[tuple[str, ...]] = ("num_workers",)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 (0 builds "
                              f"the batches in the training process)")
        if self.judge_prompts < 0:
            raise ConfigError(f"data.judge_prompts={self.judge_prompts} must be >= 0 "
                              f"(0 turns judging off)")


@dataclass
class ParallelConfig:
    # Mesh dims; their product must equal the number of processes (dp_shard=-1 fills).
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    cp_mode: CPMode = CPMode.allgather_kv
    engine: Engine = Engine.fsdp2
    # The dtype FSDP2 gathers the fp32 weights in for compute (DeepSpeed: its bf16 section);
    # reductions and master weights stay fp32. auto: the resolved trainer.precision.
    param_dtype: Precision = Precision.auto
    zero_stage: int = 2                      # DeepSpeed only
    offload_optimizer: bool = False          # DeepSpeed only: optimizer state on CPU
    offload_params: bool = False             # DeepSpeed ZeRO-3 only: parameters on CPU
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    checkpoint_every: int = 2  # with every_k: checkpoint blocks 0, k, 2k, ...
    compile: bool = False      # torch.compile each DiT block
    # Collective timeout of the world group and every mesh group: long enough for the
    # slowest collective (a 30B checkpoint's load), short enough that a hung rank fails.
    timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes={self.timeout_minutes} must be > 0 "
                              f"(minutes a collective may wait before the run fails)")
        if self.checkpoint_every < 1:
            raise ConfigError(f"parallel.checkpoint_every={self.checkpoint_every} must be >= 1")
        try:
            check_zero(self.zero_stage, self.offload_params)
            if self.engine is Engine.deepspeed:
                check_dims(self.tp, self.cp)
        except ValueError as error:
            raise ConfigError(str(error)) from None


class PixelTarget(Enum):
    noise = "noise"  # decode x_t and the latent rebuilt with the predicted noise (the paper's)
    clean = "clean"  # decode x1 and the clean estimate x̂1 (blurry in arXiv 2409.17565)


@dataclass
class PixelLossConfig:
    """Pixel-space post-training (arXiv 2409.17565): ``weight`` × mean ‖D(a) − D(b)‖² through
    the frozen autoencoder's decoder D, added to the latent loss (0: off). ``frames``: decode
    at most this many consecutive latent frames per sample (0: all); ``crop``: [height,
    width] pixels of a random crop per sample (multiples of the spatial compression; []:
    whole frames); both drawn from the step's generator. ``checkpointing`` recomputes the
    decoder's blocks in backward; ``dtype`` is the decoder's weights and activations."""

    weight: float = 0.0
    target: PixelTarget = PixelTarget.noise
    frames: int = 0
    crop: list[int] = field(default_factory=list)
    checkpointing: bool = False
    dtype: Precision = Precision.fp32

    def __post_init__(self) -> None:
        self.crop = [int(n) for n in self.crop]  # Hydra passes a ListConfig
        if self.dtype is Precision.auto:
            raise ConfigError("recipe.pixel_loss.dtype=auto is not a dtype: set fp32 or bf16 "
                              "(the frozen decoder's weights and activations)")
        if not 0.0 <= self.weight < float("inf"):
            raise ConfigError(f"recipe.pixel_loss.weight={self.weight} must be a finite "
                              f"number >= 0 (8 for a DiT in arXiv 2409.17565; 0 turns it off)")
        if self.frames < 0:
            raise ConfigError(f"recipe.pixel_loss.frames={self.frames} must be >= 0 "
                              f"(0 decodes every latent frame)")
        if self.crop and (len(self.crop) != 2 or min(self.crop) < 1):
            raise ConfigError(f"recipe.pixel_loss.crop={self.crop} must be [height, width] in "
                              f"pixels, both >= 1, or [] for whole frames")


@dataclass
class PlateauConfig:
    """recipe.schedule=plateau: after warm-up the LR is recipe.lr, multiplied by ``factor``
    each time recipe.val_metric has not improved by more than ``threshold`` (relative) for
    ``patience`` validations in a row, never below ``min_lr`` (Movie Gen halves 6e-5 down
    to 1e-5 at 768 px, arXiv 2410.13720)."""

    patience: int = 3
    factor: float = 0.5
    min_lr: float = 1e-5
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ConfigError(f"recipe.plateau.patience={self.patience} must be >= 1 "
                              f"(validations without improvement before the LR is cut)")
        if not 0.0 < self.factor < 1.0:
            raise ConfigError(f"recipe.plateau.factor={self.factor} must lie in (0, 1), "
                              f"e.g. 0.5 to halve")
        if self.min_lr < 0 or self.threshold < 0:
            raise ConfigError(f"recipe.plateau.min_lr={self.min_lr} and "
                              f"recipe.plateau.threshold={self.threshold} must be >= 0")


@dataclass
class EarlyStopConfig:
    """Stop the run once recipe.val_metric has not improved by more than ``min_delta``
    (relative) for ``patience`` validations in a row (0: never); the best checkpoint is
    kept and named in the run's best.json."""

    patience: int = 0
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience < 0 or self.min_delta < 0:
            raise ConfigError(f"recipe.early_stop.patience={self.patience} and "
                              f"recipe.early_stop.min_delta={self.min_delta} must be >= 0 "
                              f"(patience 0 turns early stopping off)")


@dataclass
class RecipeConfig:
    batch_size: int = 16  # global: split over the data-parallel replicas
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: LRSchedule = LRSchedule.cosine
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    sigma_min: float = 1e-5
    t_mean: float = 0.0
    t_std: float = 1.0
    pixel_loss: PixelLossConfig = field(default_factory=PixelLossConfig)
    # Offset noise (arXiv 2309.15807 quality tuning): x0 = eps + noise_offset * delta, delta
    # one N(0, 1) per sample and channel (models/flow.py); 0 draws nothing extra.
    noise_offset: float = 0.0
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # The validation metric (lower is better) that plateau and early_stop watch: loss (the
    # training weights), loss_ema (the EMA weights, the ones sampled), l1 for task=tae, ...
    val_metric: str = "loss"
    # The recipe's hard cap on trainer.max_steps (quality tuning stops at <= 15K iterations
    # in arXiv 2309.15807); null: none.
    step_cap: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"recipe.batch_size={self.batch_size} must be >= 1")
        if not 0.0 <= self.noise_offset < float("inf"):
            raise ConfigError(f"recipe.noise_offset={self.noise_offset} must be a finite number "
                              f">= 0 (0.1 in arXiv 2309.15807; 0 turns it off)")
        if self.step_cap is not None and self.step_cap < 1:
            raise ConfigError(f"recipe.step_cap={self.step_cap} must be >= 1, or null for none")
        if self.schedule is LRSchedule.plateau and self.plateau.min_lr > self.lr:
            raise ConfigError(f"recipe.plateau.min_lr={self.plateau.min_lr} exceeds recipe.lr="
                              f"{self.lr}: the plateau schedule only lowers the LR; set min_lr "
                              f"<= lr")
        if self.lr <= 0:
            raise ConfigError(f"recipe.lr={self.lr} must be positive")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"recipe.caption_dropout={self.caption_dropout} must lie in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"recipe.ema_decay={self.ema_decay} must lie in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"recipe.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"recipe.sigma_min={self.sigma_min} must lie in [0, 1)")


@dataclass
class TAERecipeConfig(RecipeConfig):
    """Training the autoencoder (task=tae): the loss weights, and the patch discriminator's
    size when ``discriminator`` is on (hinge loss with an adaptive weight)."""

    loss: TAELossConfig = field(default_factory=TAELossConfig)
    discriminator: bool = False
    disc_channels: int = 32
    disc_layers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ConfigError(f"recipe.disc_channels={self.disc_channels} and "
                              f"recipe.disc_layers={self.disc_layers} must be >= 1")


@dataclass
class WandbConfig:
    project: str = "cinetron"
    mode: WandbMode = WandbMode.offline
    entity: str | None = None


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    seed: int = 0
    device: str = "cpu"
    # auto: bf16 autocast on a CUDA GPU with bf16, fp32 elsewhere (trainer.precision)
    precision: Precision = Precision.auto
    # TF32 in CUDA matmuls and convolutions; null: on for CUDA (true on the CPU is an error)
    tf32: bool | None = None
    # Steps between host reads of the step values (loss, grad norm, lr, skip counts): in
    # between they stay on the device, so a step never waits for it; each read writes the
    # steps since the last one to metrics.jsonl. Validation, sample and checkpoint steps
    # read too. A preemption signal is agreed at a read, so a preempted run stops (and
    # checkpoints) at most log_every steps after it; the max_nonfinite_steps stop also
    # surfaces at the next read, naming the step where the limit was reached.
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 4
    sample_every: int = 500
    sample_steps: int = 25
    guidance_scale: float = 7.5
    sample_prompts: list[str] = field(default_factory=list)
    # Euler steps of the judged validation samples (data.judge_prompts, synthetic data)
    judge_steps: int = 10
    ckpt_every: int = 100
    keep_last: int = 3
    # Write checkpoints in a background thread (dcp.async_save; fsdp2 engine only): the
    # training steps go on, and the checkpoint is published once its write completes.
    async_checkpoint: bool = False
    max_nonfinite_steps: int = 5
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # A fresh run starts from these weights (a run dir, one of its checkpoints/step_N or a
    # safetensors file) with a new optimizer at step 0; a run with a checkpoint of its own
    # resumes from it instead. init_ema: the source's EMA (true) or training weights.
    # init_allow_missing: fnmatch patterns of tensors that may be missing on either side
    # (a missing one keeps its fresh init).
    init_from: str | None = None
    init_ema: bool = True
    init_allow_missing: list[str] = field(default_factory=list)
    # resume even with settings that cannot change within a run (trainer.resume_settings)
    force: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "val_every", "val_batches", "sample_every",
                     "ckpt_every", "keep_last", "max_nonfinite_steps", "sample_steps",
                     "judge_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1")


@dataclass
class TrainConfig:
    model: Any = MISSING
    autoencoder: Any = MISSING
    text: Any = MISSING
    data: Any = MISSING
    parallel: Any = MISSING
    recipe: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: Task = Task.t2v
    run_name: str = "t2v_tiny"

    def __post_init__(self) -> None:
        if self.task is not Task.tae and isinstance(self.autoencoder, TAEConfig):
            check_autoencoder_checkpoint(self.autoencoder.checkpoint)
        cap = self.recipe.step_cap
        if cap is not None and self.trainer.max_steps > cap:
            raise ConfigError(f"trainer.max_steps={self.trainer.max_steps} exceeds the recipe's "
                              f"hard cap recipe.step_cap={cap}; lower trainer.max_steps")
        check_watchable(self.recipe, self.data)
        if self.trainer.async_checkpoint and self.parallel.engine is not Engine.fsdp2:
            raise ConfigError(f"trainer.async_checkpoint=true writes DCP checkpoints, which "
                              f"parallel.engine={self.parallel.engine.value} does not use; "
                              f"set it to false or use parallel.engine=fsdp2")
        if self.task is not Task.tae:
            return
        if self.recipe.pixel_loss.weight:
            raise ConfigError(f"recipe.pixel_loss.weight={self.recipe.pixel_loss.weight} "
                              f"post-trains a DiT through the frozen decoder: it needs task=t2v; "
                              f"set it to 0 for task=tae")
        if not isinstance(self.autoencoder, TAEConfig):
            raise ConfigError("task=tae trains a temporal autoencoder, but the autoencoder "
                              "group is not one; pick autoencoder=tae_tiny (or another tae_*)")
        if not isinstance(self.recipe, TAERecipeConfig):
            raise ConfigError("task=tae needs the autoencoder's losses: use recipe=tae_adamw")
        par = self.parallel
        if par.tp > 1 or par.cp > 1 or par.engine is not Engine.fsdp2:
            raise ConfigError(f"task=tae trains data-parallel with FSDP2 only, but "
                              f"parallel.tp={par.tp}, parallel.cp={par.cp}, parallel.engine="
                              f"{par.engine.value}; set tp=1 cp=1 engine=fsdp2")


def check_watchable(recipe: RecipeConfig, data: Any) -> None:
    """The plateau schedule and early stopping watch the held-out loss: there must be one."""
    users = [f"recipe.schedule={recipe.schedule.value}"] \
        if recipe.schedule is LRSchedule.plateau else []
    if recipe.early_stop.patience:
        users.append(f"recipe.early_stop.patience={recipe.early_stop.patience}")
    held_out = (data.val_shards is not None if isinstance(data, WebDatasetConfig)
                else getattr(data, "val_samples", 0) > 0)
    if users and not held_out:
        raise ConfigError(f"{' and '.join(users)} watch the validation loss, but this run "
                          f"has no held-out data: set data.val_shards (shards) or "
                          f"data.val_samples > 0 (synthetic)")


def check_autoencoder_checkpoint(checkpoint: str | None) -> None:
    """A frozen TAE needs trained weights: a safetensors file from trainer.export."""
    how = ("train one (experiment=tae_tiny), export it (python -m trainer.export "
           "checkpoint=runs/tae_tiny output=tae.safetensors) and set "
           "autoencoder.checkpoint=tae.safetensors")
    if not checkpoint:
        raise ConfigError(f"autoencoder.checkpoint is not set: the DiT would learn the latents "
                          f"of an untrained autoencoder; {how}")
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"autoencoder.checkpoint={checkpoint} is not a file; {how}")


def check_frozen_copy(cfg: TrainConfig, what: str, alternative: str = "") -> None:
    """A task that trains against a frozen copy of ``trainer.init_from`` (DPO's reference,
    a distilled student's teacher) needs that source, and FSDP2 to shard the copy like the
    trained model. ``what`` names the setting that asks for the copy."""
    if not cfg.trainer.init_from:
        raise ConfigError(f"{what} trains against a frozen copy of trainer.init_from, which "
                          f"is not set: point it at the run (or checkpoint, or safetensors "
                          f"file) it starts from")
    if cfg.parallel.engine is not Engine.fsdp2:
        raise ConfigError(f"{what} shards its frozen copy of trainer.init_from like the "
                          f"trained model with FSDP2, but parallel.engine="
                          f"{cfg.parallel.engine.value}; use parallel.engine=fsdp2"
                          f"{alternative}")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="dit_schema", node=DiTConfig)
    cs.store(group="autoencoder", name="identity_schema", node=IdentityAutoencoderConfig)
    cs.store(group="autoencoder", name="tae_schema", node=TAEConfig)
    cs.store(group="text", name="text_schema", node=TextConfig)
    cs.store(group="text/encoder", name="byte_schema", node=ByteTextEncoderConfig)
    cs.store(group="text/encoder", name="t5_schema", node=T5EncoderConfig)
    cs.store(group="text/encoder", name="byt5_schema", node=ByT5EncoderConfig)
    cs.store(group="text/encoder", name="clip_schema", node=CLIPEncoderConfig)
    cs.store(group="text/encoder", name="minilm_schema", node=MiniLMEncoderConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    cs.store(group="data", name="webdataset_schema", node=WebDatasetConfig)
    cs.store(group="data", name="latents_schema", node=LatentDataConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="recipe", name="recipe_schema", node=RecipeConfig)
    cs.store(group="recipe", name="tae_recipe_schema", node=TAERecipeConfig)
    cs.store(group="data", name="preference_schema", node=PreferenceDataConfig)
    cs.store(group="data", name="preference_latents_schema", node=PreferenceLatentDataConfig)
    # imported here: the preference recipe extends RecipeConfig, defined in this module
    from trainer.preference_config import PreferenceRecipeConfig

    cs.store(group="recipe", name="preference_recipe_schema", node=PreferenceRecipeConfig)
    from trainer.distill_config import DistillRecipeConfig

    cs.store(group="recipe", name="distill_recipe_schema", node=DistillRecipeConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed DictConfig -> dataclasses (runs every ``__post_init__`` check), after the
    key and ``_target_`` checks (``trainer.config_guards``)."""
    try:
        check_known_keys(cfg)
        check_targets(cfg)
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} is not set (it has no default); set it") from None
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from error
