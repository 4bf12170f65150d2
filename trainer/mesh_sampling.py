"""Sampling on a device mesh: ``launch/torchrun.sh 4 -m trainer.sample checkpoint=...
prompt=... parallel.tp=2 parallel.cp=2`` (or under SLURM, ``launch/slurm.sbatch``).

The mesh is the training one, ``cfg × cp × tp`` with the CFG branches on the outer
(data-parallel) dim: the model is built on meta, sharded with the training plan
(``apply_model_parallel``: TP/SP, then CP), and each rank reads only its shards. Every
rank runs the same sampler on the same noise; the DiT's output is whole on every rank, so
the trajectory is the one process's within fp32 rounding. With ``cfg_parallel`` the
conditional and unconditional passes run on different ranks (``parallel.cfg_parallel``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.block_cache import CacheSettings
from models.dit import patch_grid
from parallel.cfg_parallel import BatchSplit
from parallel.context_parallel import SequenceShards
from parallel.mesh import MeshDims, ParallelContext, init_parallel, read_launch_env
from parallel.parallelize import apply_model_parallel
from trainer.build import single_process
from trainer.config import ConfigError, CPMode, TrainConfig
from trainer.start_checks import check_heads_fit
from trainer.trained import TrainedRun, load_text_to_video


@dataclass
class SampleParallelConfig:
    # Their product (x2 with cfg_parallel) must equal the number of processes launched.
    tp: int = 1
    cp: int = 1
    cp_mode: CPMode = CPMode.allgather_kv
    cfg_parallel: bool = False    # conditional and unconditional passes on different ranks
    timeout_minutes: float = 30.0


def sampling_dims(par: SampleParallelConfig, world_size: int) -> MeshDims:
    """The mesh (dp_replicate = the CFG branches, cp, tp) for ``world_size`` processes;
    refused, naming the numbers, when it does not fit."""
    for name in ("tp", "cp"):
        if getattr(par, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(par, name)} must be >= 1")
    branches = 2 if par.cfg_parallel else 1
    needed = branches * par.cp * par.tp
    if needed != world_size:
        cfg = "parallel.cfg_parallel (2) × " if par.cfg_parallel else ""
        raise ConfigError(f"{world_size} process{'es' if world_size > 1 else ''} launched but "
                          f"{cfg}parallel.cp={par.cp} × parallel.tp={par.tp} = {needed}; "
                          f"launch {needed} (launch/torchrun.sh {needed} -m trainer.sample "
                          f"...) or change the mesh")
    return MeshDims(dp_replicate=branches, dp_shard=1, cp=par.cp, tp=par.tp)


def check_model_fits(heads: int, par: SampleParallelConfig) -> None:
    """The training mesh's rule on heads, for the sampling mesh."""
    check_heads_fit(heads, par.tp, par.cp, par.cp_mode)


def start_sampling_mesh(par: SampleParallelConfig, device: str) -> ParallelContext:
    """This process's place in the sampling mesh (one process: no process group, on
    ``device`` as given)."""
    dims = sampling_dims(par, read_launch_env().world_size)
    if dims.shape == (1, 1, 1, 1):
        return single_process(torch.device(device))
    return init_parallel(dims, torch.device(device).type, par.timeout_minutes)


class MeshSharding:
    """How ``load_text_to_video`` shards a run's meta model on the sampling mesh: the
    training plan, after checking that the run's head count fits the mesh. Keeps the
    context-parallel sequence shards, whose row sums the dynamic block caches decide on."""

    def __init__(self, ctx: ParallelContext, par: SampleParallelConfig):
        self.ctx, self.par = ctx, par
        self.shards: SequenceShards | None = None

    def __call__(self, cfg: TrainConfig, model: nn.Module) -> None:
        check_model_fits(cfg.model.heads, self.par)
        self.shards = apply_model_parallel(model.dit, self.ctx, self.par.cp_mode.value)

    def cache(self, settings: CacheSettings) -> CacheSettings:
        """``settings`` with this mesh's row sums, so every cp rank takes the same dynamic
        cache decision and the blocks' collectives stay matched (tensor-parallel sums are
        whole already)."""
        if self.shards is None or settings.mode == "none":
            return settings
        return dataclasses.replace(settings, sum_rows=self.shards.row_sums)


def load_on_mesh(checkpoint: str, par: SampleParallelConfig, device: str, ema: bool,
                 **shape: int | None) -> tuple[TrainedRun, MeshSharding]:
    """This process's place in the sampling mesh ``par`` and its shards of the run at
    ``checkpoint`` (``shape``: frames, height, width overrides)."""
    ctx = start_sampling_mesh(par, device)
    sharding = MeshSharding(ctx, par)
    run = load_text_to_video(Path(checkpoint), ctx.device, ema, ctx=ctx, parallelize=sharding,
                             **shape)
    return run, sharding


def check_split_guidance(par: SampleParallelConfig, guidance: str, cache: str) -> None:
    """CFG parallel needs two branches, and block caches keep both branches' rows."""
    if not par.cfg_parallel:
        return
    if guidance == "none":
        raise ConfigError("parallel.cfg_parallel=true puts the conditional and unconditional "
                          "passes on different ranks, and guidance=none (or a distilled "
                          "student) has only the conditional one; drop cfg_parallel")
    if cache != "none":
        raise ConfigError(f"parallel.cfg_parallel=true with cache={cache} is not supported: "
                          f"the cache holds both branches' rows; use parallel.cp or "
                          f"parallel.tp with the cache, or cache=none")


def split_guidance(dit: nn.Module, ctx: ParallelContext) -> BatchSplit | None:
    """With CFG parallel (a dp dim of 2), each rank runs its half of every guided batch."""
    return BatchSplit(dit, ctx.group("dp")) if ctx.distributed and ctx.dims.dp > 1 else None


@dataclass
class SamplingSpeed:
    seconds: float        # this rank's wall time for the videos (DiT steps and decode)
    tokens: int           # video tokens through the DiT: tokens per video x NFE, summed
    ranks: int
    exchanged_bytes: int  # CFG parallel: velocity bytes this rank sent its peer

    @property
    def tokens_per_second_per_rank(self) -> float:
        return self.tokens / max(self.seconds, 1e-9) / self.ranks

    def describe(self, videos: int, ctx: ParallelContext, cp_mode: str) -> str:
        dims = ctx.dims
        mesh = " × ".join(f"{name} {size}" for name, size in
                          (("cfg", dims.dp), ("cp", dims.cp), ("tp", dims.tp)) if size > 1)
        where = f"{self.ranks} rank{'s' if self.ranks > 1 else ''}"
        if mesh:
            where += f" ({mesh}{f', {cp_mode}' if dims.cp > 1 else ''})"
        line = (f"sampled {videos} video{'s' if videos > 1 else ''} in {self.seconds:.2f} s "
                f"on {where}: {self.tokens_per_second_per_rank:,.0f} DiT tokens/s per rank")
        if dims.dp > 1:
            line += f", CFG branches exchanged {self.exchanged_bytes:,} bytes per rank"
        return line


def video_tokens(cfg: TrainConfig, latent_shape: tuple[int, int, int, int]) -> int:
    """The DiT's tokens for one video of ``latent_shape`` (C, T, H, W)."""
    return math.prod(patch_grid(cfg.model, latent_shape))
