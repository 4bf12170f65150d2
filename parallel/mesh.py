"""The one place that starts torch.distributed and builds the device mesh.

Mesh dims, outermost first: ``dp_replicate × dp_shard × cp × tp`` (tp innermost, so a
tensor-parallel group stays inside one node). Flattened views handed out by name:
  - ``dp``          = dp_replicate × dp_shard: ranks that see different samples;
  - ``dp_shard_cp`` = dp_shard × cp: the FSDP shard group (params are replicated over cp);
  - ``dp_cp``       = dp × cp: ranks whose gradients are partial sums of one loss.
All cp/tp ranks of one data-parallel replica share a dp coordinate, so the data pipeline
feeds them the same sample.

The launcher is read from the environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) or none (one process, no process group).
The backend follows the device: nccl on cuda, gloo on cpu.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshDims:
    """Sizes of the four mesh dims; ``dp_shard=-1`` takes what the others leave."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1

    def resolved(self, world_size: int) -> MeshDims:
        """Fill ``dp_shard=-1`` and check that the product equals the world size."""
        for name in ("dp_replicate", "cp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        others = self.dp_replicate * self.cp * self.tp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"world size {world_size} is not divisible by parallel.dp_replicate="
                    f"{self.dp_replicate} × parallel.cp={self.cp} × parallel.tp={self.tp} = "
                    f"{others}; launch a multiple of {others} processes")
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={dp_shard} must be >= 1 (or -1: fill)")
        if others * dp_shard != world_size:
            raise ValueError(
                f"world size {world_size} != parallel.dp_replicate={self.dp_replicate} × "
                f"parallel.dp_shard={dp_shard} × parallel.cp={self.cp} × parallel.tp="
                f"{self.tp} = {others * dp_shard}; change the mesh or the process count")
        return MeshDims(self.dp_replicate, dp_shard, self.cp, self.tp)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | none


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank and world size from torchrun or SLURM variables; one process without either."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                         int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in env:
                raise ValueError(f"SLURM job without {key}: export it in the sbatch script "
                                 f"(launch/slurm.sbatch does) before srun")
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), "slurm")
    return LaunchEnv(0, 1, 0, "none")


@dataclass
class ParallelContext:
    """This process's place in the mesh. ``mesh`` is None for a single process."""

    dims: MeshDims
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None = None
    named: dict[str, DeviceMesh] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def submesh(self, name: str) -> DeviceMesh:
        """A named 1-D view of the mesh: one of MESH_DIMS, dp, dp_shard_cp, dp_cp, or the
        2-D ``hsdp`` mesh (dp_replicate, dp_shard_cp)."""
        assert self.mesh is not None, "a single process has no mesh"
        return self.named[name]

    def group(self, name: str) -> dist.ProcessGroup | None:
        return self.submesh(name).get_group() if self.distributed else None

    def coordinate(self, name: str) -> int:
        return self.submesh(name).get_local_rank() if self.distributed else 0

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank: which slice of each global batch this process loads."""
        return self.coordinate("dp")

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def sum_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a per-replica tensor over the data-parallel replicas (no gradient)."""
        if not self.distributed or self.dp_size == 1:
            return value.detach()
        total = value.detach().clone()
        dist.all_reduce(total, group=self.group("dp"))
        return total

    def mean_over_dp(self, value: torch.Tensor) -> float:
        """Mean of a per-replica value over the data-parallel replicas (gloo has no AVG)."""
        if not self.distributed or self.dp_size == 1:
            return value.item()
        total = value.detach().float().clone()
        dist.all_reduce(total, group=self.group("dp"))
        return total.item() / self.dp_size


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_parallel(dims: MeshDims, device_type: str = "cpu") -> ParallelContext:
    """Start the process group (if launched with several processes) and build the mesh."""
    env = read_launch_env()
    dims = dims.resolved(env.world_size)
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device(device_type)
    if env.world_size == 1:
        return ParallelContext(dims, 0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size)
    mesh = init_device_mesh(device.type, dims.shape, mesh_dim_names=MESH_DIMS)
    # Flattened views are kept here: slicing them back out of the root mesh is deprecated.
    named = {name: mesh[name] for name in MESH_DIMS}
    named["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    named["dp_shard_cp"] = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    named["dp_cp"] = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    named["hsdp"] = DeviceMesh._concatenate([named["dp_replicate"], named["dp_shard_cp"]])
    return ParallelContext(dims, env.rank, env.world_size, device, mesh, named)


def shutdown(ctx: ParallelContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
