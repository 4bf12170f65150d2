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
The backend follows the device: nccl on cuda, gloo on cpu. On cuda the world group is
bound to this rank's GPU (``device_id``), so NCCL connects eagerly and every mesh group
is split from it (``ncclCommSplit``: one call per mesh dim) instead of bootstrapping each
communicator through the store. Every group gets ``parallel.timeout_minutes``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
FLATTENED = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
             "dp_cp": ("dp_replicate", "dp_shard", "cp")}


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
                                 f"before srun (launch/slurm.sbatch and the setup of "
                                 f"hydra/launcher=slurm, conf/hydra/launcher/slurm.yaml, do)")
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), "slurm")
    local_tasks = int(env.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if local_tasks > 1:
        raise ValueError(f"hydra.launcher.tasks_per_node={local_tasks} under submitit_local "
                         f"starts separate processes with no process group between them; "
                         f"set it to 1 (cluster=local does) and run a multi-process mesh "
                         f"with launch/torchrun.sh")
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

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a per-replica value over the data-parallel replicas: 0-d float32 on the
        value's device, not read to the host (gloo has no AVG: a sum, then a division)."""
        if not self.distributed or self.dp_size == 1:
            return value.detach().float()
        return self.sum_over_dp(value.float()) / self.dp_size


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def bind_device(device_type: str, local_rank: int) -> torch.device:
    """This rank's device: on cuda GPU ``local_rank % device_count`` (one GPU per task on
    sites that hide the others: every task then sees its GPU as 0)."""
    if device_type != "cuda":
        return torch.device(device_type)
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use "
                         "trainer.device=cpu or check CUDA_VISIBLE_DEVICES")
    device = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(device)
    return device


def group_options(backend: str, timeout: timedelta):
    """Backend options that carry ``timeout`` to the mesh's sub-groups (they would
    otherwise get the backend's default, not the world group's)."""
    options = (dist.ProcessGroupNCCL.Options() if backend == "nccl"
               else dist.ProcessGroupGloo._Options())
    options._timeout = timeout
    return options


def init_parallel(dims: MeshDims, device_type: str = "cpu",
                  timeout_minutes: float = 30.0) -> ParallelContext:
    """Start the process group (if launched with several processes) and build the mesh."""
    env = read_launch_env()
    dims = dims.resolved(env.world_size)
    device = bind_device(device_type, env.local_rank)
    if env.world_size == 1:
        return ParallelContext(dims, 0, 1, device)
    backend, timeout = backend_for(device), timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    options = group_options(backend, timeout)

    def override(size: int):
        # a group spanning the world reuses the world group (no new communicator)
        return None if size == env.world_size else options

    mesh = init_device_mesh(device.type, dims.shape, mesh_dim_names=MESH_DIMS,
                            backend_override={name: options for name, size in
                                              zip(MESH_DIMS, dims.shape, strict=True)
                                              if size != env.world_size})
    # Flattened views are kept here: slicing them back out of the root mesh is deprecated.
    named = {name: mesh[name] for name in MESH_DIMS}
    for name, parts in FLATTENED.items():
        size = math.prod(dims.shape[MESH_DIMS.index(part)] for part in parts)
        named[name] = mesh[parts]._flatten(name, backend_override=override(size))
    named["hsdp"] = DeviceMesh._concatenate([named["dp_replicate"], named["dp_shard_cp"]])
    return ParallelContext(dims, env.rank, env.world_size, device, mesh, named)


def shutdown(ctx: ParallelContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
