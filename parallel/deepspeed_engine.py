"""DeepSpeed ZeRO (stage 1/2/3, optional CPU offload) as a data-parallel training engine.

It implements ``parallel.engine.TrainingEngine``, the interface the trainer drives the
FSDP2 engine through too. Every rank is a data-parallel rank
(DeepSpeed here requires tp = cp = 1, so the mesh's ``dp`` group spans all ranks, which is
DeepSpeed's default data-parallel group). Each rank feeds its slice of the global batch and
backpropagates the mean loss of that slice; DeepSpeed averages the gradients over the ranks,
which equals the gradient of the global-batch mean when the slices are equal.

Precision: with ``bf16`` (the trainer's resolved ``parallel.param_dtype``) DeepSpeed's bf16
section holds the model's weights in bf16 (forward under bf16 autocast), keeps fp32 master
weights in the optimizer and reduces gradients in fp32; without it everything is fp32.

The optimizer is whatever the trainer's factory builds (torch AdamW + LambdaLR); with
``offload_optimizer`` it steps the fp32 master weights in CPU memory.
DeepSpeedCPUAdam(adamw_mode=True) is the faster CPU step (DeepSpeed quotes 5-7x) and a
factory may return it, but its C++ op JIT-compiles on first use (~3 min on 2 cores; cached
in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.init import DrawTally, initial_value
from parallel.checkpoint import TRAINER_STATE_FILE
from parallel.engine import OptimizerFactory
from parallel.mesh import ParallelContext

# torch.nn.init's random fills, which module constructors call: skipped while a ZeRO-3
# model is built, since every value is overwritten by its (seed, name) initial value.
RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                "xavier_uniform_", "xavier_normal_", "orthogonal_")

CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's files go to <directory>/deepspeed/


def ema_shard_path(directory: Path, rank: int) -> Path:
    """Beside DeepSpeed's folder: rank ``rank``'s EMA tensors."""
    return Path(directory) / f"ema_rank{rank:05d}.pt"


def check_dims(tp: int, cp: int) -> None:
    """DeepSpeed shards over data parallelism only: tensor/context parallel must be off."""
    if tp > 1 or cp > 1:
        raise ValueError(
            f"parallel.engine=deepspeed supports data parallelism only, but parallel.tp="
            f"{tp} and parallel.cp={cp}; set parallel.tp=1 parallel.cp=1 (every rank then "
            f"is a ZeRO data-parallel rank) or use parallel.engine=fsdp2")


def check_zero(zero_stage: int, offload_params: bool) -> None:
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage} must be 1, 2 or 3")
    if offload_params and zero_stage != 3:
        raise ValueError(f"parallel.offload_params=true needs parallel.zero_stage=3 (got "
                         f"{zero_stage}): only ZeRO-3 partitions the parameters")


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the accelerator of ``device`` (cpu: no CUDA is touched)."""
    # DeepSpeed picks its accelerator once, on import; the variable skips its detection.
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    picked = get_accelerator().device_name()
    if picked != device.type:
        raise ValueError(f"DeepSpeed runs on '{picked}' but trainer.device={device.type}; "
                         f"set DS_ACCELERATOR={device.type} (or unset it) before the launch")
    return deepspeed


def ds_config(batch_size: int, dp_size: int, grad_clip: float, zero_stage: int,
              offload_optimizer: bool, offload_params: bool, bf16: bool = False) -> dict:
    """The DeepSpeed config: micro-batch from the global batch, clipping, ZeRO switches,
    and with ``bf16`` the bf16 section (bf16 weights, fp32 master and reduction)."""
    check_zero(zero_stage, offload_params)
    if batch_size % dp_size:
        raise ValueError(f"recipe.batch_size={batch_size} (the global batch) is not divisible "
                         f"by the {dp_size} data-parallel ranks; pick a multiple of {dp_size}")
    zero: dict = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    # bf16 gradients are summed over the ranks in fp32, as FSDP2's reduce_dtype does
    precision = {"bf16": {"enabled": True}, "communication_data_type": "fp32"} if bf16 else {}
    return precision | {
        "train_micro_batch_size_per_gpu": batch_size // dp_size,
        "gradient_accumulation_steps": 1,
        # DeepSpeed clips inside engine.step(), with torch's formula; 0 disables it.
        "gradient_clipping": grad_clip if math.isfinite(grad_clip) else 0.0,
        "zero_optimization": zero,
        # Our client AdamW is not on DeepSpeed's vetted list; it works with every stage, and
        # with offload it steps the CPU-resident fp32 master (see the module docstring).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
    }


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Module constructors leave their weights unfilled (the tensors are allocated)."""
    saved = {name: getattr(nn.init, name) for name in RANDOM_INITS}
    try:
        for name in RANDOM_INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def build_partitioned(build: Callable[[], nn.Module], config: dict, device: torch.device,
                      seed: int) -> tuple[nn.Module, int]:
    """ZeRO-3: ``build()`` runs under ``deepspeed.zero.Init``, which splits each module's
    parameters over the ranks as soon as that module is constructed, so no rank ever holds
    more than one module's full weights; then each rank fills its own partitions with the
    single-process initial values. Returns the model and the elements this rank drew."""
    deepspeed = import_deepspeed(device)
    with skip_random_init(), deepspeed.zero.Init(config_dict_or_path=config):
        model = build()
    return model, fill_partitions(model, seed, dist.get_rank())


@torch.no_grad()
def fill_partitions(model: nn.Module, seed: int, rank: int) -> int:
    """Write each ZeRO-3 parameter's initial value into this rank's flat partition
    (``ds_tensor``: elements [rank * n, rank * n + n) of the flattened parameter, the
    last rank's padded), drawing only the rows the partition overlaps."""
    tally = DrawTally()
    for name, param in model.named_parameters():
        part, shape = param.ds_tensor, param.ds_shape
        start = rank * part.numel()
        stop = min(start + part.numel(), param.ds_numel)
        if stop <= start:
            continue  # a partition of padding only
        row = math.prod(shape[1:])
        first, end = start // row, -(-stop // row)
        index = (slice(first, end), *(slice(None) for _ in shape[1:]))
        rows = initial_value(model, name, shape, seed, index, tally).flatten()
        part[: stop - start].copy_(rows[start - first * row: stop - first * row])
    return tally.elements


class DeepSpeedEngine:
    """A model in a DeepSpeed ZeRO engine, stepping the optimizer ``make_optimizer`` builds.

    ``make_optimizer(params) -> (optimizer, scheduler)`` is the trainer's factory (the one
    NativeEngine takes), so the LR schedule is the single-process one; ``scheduler`` is
    stepped by the trainer every step. ``batch_size`` is the global batch, ``grad_clip``
    the max gradient norm (inf or <= 0: no clipping), ``bf16`` DeepSpeed's bf16 section.
    Build the same model on every rank.
    """

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory,
                 ctx: ParallelContext, *, batch_size: int, grad_clip: float, zero_stage: int,
                 offload_optimizer: bool = False, offload_params: bool = False,
                 bf16: bool = False):
        check_dims(ctx.dims.tp, ctx.dims.cp)
        if not dist.is_initialized() and "RANK" not in os.environ:
            raise ValueError("parallel.engine=deepspeed needs torch.distributed: launch with "
                             "torchrun (also for one process: torchrun --nproc_per_node=1)")
        self.grad_clip = grad_clip if grad_clip > 0 else math.inf
        config = ds_config(batch_size, ctx.dp_size, self.grad_clip, zero_stage,
                           offload_optimizer, offload_params, bf16)
        deepspeed = import_deepspeed(ctx.device)
        self.zero_stage = zero_stage
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # ZeRO keeps the client's param-group dicts, so the LR the scheduler writes there is
        # the LR DeepSpeed's step uses. The scheduler stays ours (not given to DeepSpeed):
        # the trainer steps it every step, skipped updates included.
        optimizer, self.scheduler = make_optimizer(self.params)
        self._gate_optimizer(optimizer)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        # The engine itself, not the bare model: its forward prepares ZeRO's backward hooks.
        # Model attributes (e.g. ``module.dit``) pass through it.
        self.module: nn.Module = self.engine

    def _gate_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the inner optimizer's update conditional on ``self._allow``.

        DeepSpeed computes the global gradient norm inside engine.step() and only then calls
        the inner optimizer (once per param group / sub-group). The gate asks ``allow_update``
        at that point, once per step; a refused step leaves weights, fp32 master weights and
        Adam moments untouched while DeepSpeed still drops the gradients as usual.
        """
        inner_step = optimizer.step
        self._allow: Callable[[float], bool] | None = None
        self._decision: bool | None = None

        @functools.wraps(inner_step)  # keeps LambdaLR's marker: no 'step overridden' warning
        def gated_step(*args, **kwargs):
            if self._decision is None:
                # ZeRO sets the norm (before clipping) right before calling the optimizer.
                self._decision = bool(self._allow(float(self.engine.optimizer._global_grad_norm)))
            return inner_step(*args, **kwargs) if self._decision else None

        optimizer.step = gated_step

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def num_trainable(self) -> int:
        """ZeRO-3 leaves each parameter an empty placeholder; ``ds_numel`` is its size."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.params)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's mean loss; gradients are averaged over the dp ranks.

        Collective: call it on every rank every step, also for a non-finite loss (the
        non-finite gradients then make DeepSpeed skip the update).
        """
        self.engine.backward(loss)

    def clip_and_step(self, max_norm: float, allow_update: Callable[[float], bool]) -> float:
        """Global gradient norm before clipping; clips to ``max_norm``; updates if allowed.

        ``max_norm`` must be the recipe's clip (inf when recipe.grad_clip <= 0): DeepSpeed
        fixes it at init. ``allow_update(norm)`` is called exactly once, on every rank, before
        any weight changes; the update happens iff it returns True. It must answer the same on
        all ranks (the norm is global, so a pure function of it and the global loss does).
        A non-finite norm (reported as inf) never updates: DeepSpeed skips that step itself.
        """
        if max_norm != self.grad_clip:
            raise ValueError(f"clip_and_step(max_norm={max_norm}) differs from the clip the "
                             f"DeepSpeed engine was built with ({self.grad_clip}, from "
                             f"recipe.grad_clip); DeepSpeed fixes gradient_clipping at init")
        self._allow, self._decision = allow_update, None
        self.engine.step()
        if self._decision is False:
            self._relink_optimizer_views()
        norm = float(self.engine.get_global_grad_norm())
        if self._decision is None:  # DeepSpeed skipped a non-finite step without asking
            allow_update(norm)
        return norm

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The local tensors of the trainable weights, by parameter name, for an EMA.

        ZeRO-1/2: the (replicated) parameters themselves. ZeRO-3: each parameter's local
        flat partition (``ds_tensor``, padded on the last rank), so the EMA is sharded like
        the weights. The tensors are updated in place by every step. Before writing into
        them (swapping EMA weights in or out) call ``release_params``.
        """
        named = self.model.named_parameters()
        if self.zero_stage == 3:
            return {name: p.ds_tensor for name, p in named if p.requires_grad}
        return {name: p for name, p in named if p.requires_grad}

    def release_params(self) -> None:
        """ZeRO-3: return every gathered parameter to its partition, including the small
        ones DeepSpeed keeps whole ('persistent'), so the next forward gathers from the
        partitions and sees what was written into them. A no-op for ZeRO-1/2."""
        if self.zero_stage == 3:
            self.engine.empty_partition_cache()
            # The recorded fetch order assumed those params stayed gathered; a forward that
            # now has to fetch them would fail DeepSpeed's trace check, so re-record it.
            coordinator = self.engine.optimizer.parameter_offload.get_param_coordinator()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()

    def save(self, directory: Path, ema_state: dict[str, torch.Tensor],
             trainer_state: dict, asynchronous: bool = False) -> list[Path]:
        """Weights, fp32 master weights, optimizer and scheduler state into the existing
        ``directory``: DeepSpeed's files under ``deepspeed/`` (one optimizer file per rank)
        and its ``zero_to_fp32.py``, which consolidates full fp32 weights offline; beside
        them this rank's EMA tensors and rank 0's ``trainer_state``. The layout is
        DeepSpeed's own, loadable at the same ZeRO stage and dp size. Returns the files this
        rank wrote itself; DeepSpeed's are left to the checkpointer's even split.
        Collective."""
        if asynchronous:
            raise ValueError("trainer.async_checkpoint=true writes DCP checkpoints; "
                             "parallel.engine=deepspeed saves synchronously: set it to false")
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                    client_state={"scheduler": self.scheduler.state_dict()})
        own = [ema_shard_path(directory, dist.get_rank())]
        torch.save(ema_state, own[0])
        if dist.get_rank() == 0:
            own.append(Path(directory) / TRAINER_STATE_FILE)
            torch.save(trainer_state, own[-1])
        return own

    def load(self, directory: Path, ema_state: dict[str, torch.Tensor]) -> dict:
        """Restore what ``save`` wrote into ``directory``, the EMA into ``ema_state``; the
        trainer state. Collective."""
        if not (Path(directory) / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}: expected the "
                                    f"{CHECKPOINT_TAG}/ folder DeepSpeedEngine.save writes")
        _, client_state = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                                      load_lr_scheduler_states=False)
        self.scheduler.load_state_dict(client_state["scheduler"])
        self._relink_optimizer_views()
        path = ema_shard_path(directory, dist.get_rank())
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: DeepSpeed checkpoints reload only at "
                                    f"the data-parallel size that wrote them")
        for name, value in torch.load(path, weights_only=True).items():
            ema_state[name].copy_(value)
        return torch.load(Path(directory) / TRAINER_STATE_FILE, weights_only=True)

    def _relink_optimizer_views(self) -> None:
        """ZeRO-1/2 map each parameter to its slice of the Adam state (what
        deepspeed.utils.safe_get_full_optimizer_state reads) once, after the first step. A
        refused first step (no state yet) or a load (new mappings) would leave that map empty
        for good; this has the next step build it again (views only, cheap)."""
        if self.zero_stage < 3:
            self.engine.optimizer._hp_optimizer_states_linked = False

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights (parameters and buffers, by name) on every rank. Collective."""
        from deepspeed.runtime.zero import GatheredParameters

        params = list(self.model.parameters())
        # Gathers ZeRO-3 partitions for the block; a no-op for ZeRO-1/2 (replicated weights).
        with GatheredParameters(params, enabled=self.zero_stage == 3):
            state = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        return state | {name: b.detach().clone() for name, b in self.model.named_buffers()}


def load_full_weights(directory: Path, model: nn.Module,
                      ema_state: dict[str, torch.Tensor]) -> dict:
    """In one process, whatever ZeRO stage and dp size wrote it: full fp32 weights into a
    plain ``model`` and the per-rank EMA shards consolidated into ``ema_state`` (full
    tensors by name); returns the trainer state."""
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(directory),
                                                                   tag=CHECKPOINT_TAG))
    shards = [torch.load(path, weights_only=True)  # every rank's ema_shard_path, in order
              for path in sorted(directory.glob("ema_rank*.pt"))]
    for name, target in ema_state.items():
        pieces = [shard[name] for shard in shards]
        if pieces[0].shape == target.shape:  # ZeRO-1/2: every rank holds the whole tensor
            target.copy_(pieces[0])
        else:  # ZeRO-3: rank r holds the r-th padded chunk of the flattened tensor
            flat = torch.cat([piece.flatten() for piece in pieces])
            target.copy_(flat[: target.numel()].view_as(target))
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=True)
