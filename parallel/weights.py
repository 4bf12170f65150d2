"""Full weights one tensor at a time: read from any mesh's checkpoint or a safetensors
file, write a safetensors file streamed, load into a (sharded) model.

A reader lists every tensor's name, shape and dtype up front and reads one full
(unsharded) tensor on request, in this process and without collectives, so every rank of
a mesh can read what it needs and a whole-model job (averaging) never holds more than a
tensor per checkpoint. Checkpoints are the ``torch.distributed.checkpoint`` directories
``save_training_state`` writes (keyed by parameter name, so whatever mesh wrote the
shards, DCP assembles the full tensor from them); DeepSpeed's layout is refused with the
way round it (``trainer.export`` consolidates it into a safetensors file).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.dit import PositionEmbedding
from models.init import initial_value
from parallel.checkpoint import TENSORS_DIR
from parallel.deepspeed_engine import CHECKPOINT_TAG
from parallel.manifest import fsync
from parallel.quiet import single_process_checkpoint_io

Spec = tuple[torch.Size, torch.dtype]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class _MetadataOnce(FileSystemReader):
    """Reads ``.metadata`` once: the checkpoint is then read with one ``dcp.load`` per
    tensor, and each would otherwise unpickle the whole index again."""

    _cached = None

    def read_metadata(self, *args, **kwargs):
        if self._cached is None:
            self._cached = super().read_metadata(*args, **kwargs)
        return self._cached


class CheckpointWeights:
    """The model weights of a training checkpoint (``checkpoints/step_N``) written at any
    mesh; with ``ema`` the EMA weights where the run kept them (its trainable parameters)
    and the model's own elsewhere (frozen parameters), as sampling uses them."""

    def __init__(self, step_dir: Path, ema: bool):
        self.path = Path(step_dir)
        tensors = self.path / TENSORS_DIR
        if not (tensors / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path} is not a training checkpoint: "
                                    f"{tensors}/.metadata is missing")
        self.reader = _MetadataOnce(str(tensors))
        self.entries = {key: meta for key, meta in
                        self.reader.read_metadata().state_dict_metadata.items()
                        if isinstance(meta, TensorStorageMetadata)}
        # DCP flattens the saved {"model": {name: ...}, "ema": {...}} to "model.<name>"
        self.keys = {key[len("model."):]: key for key in self.entries
                     if key.startswith("model.")}
        if ema:
            for name in self.keys:
                if f"ema.{name}" in self.entries:
                    self.keys[name] = f"ema.{name}"
        self.specs: dict[str, Spec] = {
            name: (torch.Size(self.entries[key].size), self.entries[key].properties.dtype)
            for name, key in self.keys.items()}
        self.metadata: dict[str, str] = {}

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name``, assembled from whatever shards the mesh wrote."""
        key = self.keys[name]
        shape, dtype = self.specs[name]
        out = torch.empty(shape, dtype=dtype)
        with single_process_checkpoint_io():  # every rank reads whole tensors on its own
            dcp.load({key: out}, storage_reader=self.reader, no_dist=True)
        return out

    def load_local(self, targets: dict[str, torch.Tensor]) -> None:
        """Read each named tensor's part that its target holds: a DTensor's local shard
        (DCP reads only the saved chunks overlapping it), a plain tensor whole."""
        with single_process_checkpoint_io():
            dcp.load({self.keys[name]: target for name, target in targets.items()},
                     storage_reader=self.reader, no_dist=True)


class SafetensorsWeights:
    """A safetensors file (``trainer.export``, ``trainer.average``): one set of weights,
    whichever its metadata names; tensors are read one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except Exception as error:  # the library raises its own untyped errors
            raise ValueError(f"{self.path} is not a readable safetensors file: "
                             f"{error}") from error
        self.metadata: dict[str, str] = self.handle.metadata() or {}
        self.specs: dict[str, Spec] = {}
        for name in self.handle.keys():
            view = self.handle.get_slice(name)
            self.specs[name] = (torch.Size(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()])

    def read(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def load_local(self, targets: dict[str, torch.Tensor]) -> None:
        """Read each named tensor's part that its target holds: only the bytes of a
        DTensor's local shard, a plain tensor whole."""
        for name, target in targets.items():
            local = target.to_local() if isinstance(target, DTensor) else target
            index = shard_index(target)
            local.copy_(self.handle.get_tensor(name) if index is None
                        else self.handle.get_slice(name)[index])


def shard_index(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """Where this rank's local shard of a DTensor lies in the full tensor; None where the
    rank holds the whole tensor (a plain or replicated one)."""
    if not isinstance(tensor, DTensor) or all(p.is_replicate() for p in tensor.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                          tensor.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))


def open_weights(path: Path, ema: bool) -> CheckpointWeights | SafetensorsWeights:
    """A reader for a safetensors file or an intact ``checkpoints/step_N`` directory."""
    path = Path(path)
    if path.is_file():
        return SafetensorsWeights(path)
    if (path / CHECKPOINT_TAG).is_dir():
        raise ValueError(f"{path} is a DeepSpeed checkpoint, which is read only whole; "
                         f"consolidate it first (python -m trainer.export checkpoint={path} "
                         f"output=weights.safetensors ema={str(ema).lower()}) and pass the "
                         f"safetensors file")
    return CheckpointWeights(path, ema)


def write_safetensors(path: Path, specs: dict[str, Spec],
                      read: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file streamed: the header (every name, dtype, shape and byte
    range, known from ``specs``) first, then ``read(name)`` for each name in order, one
    tensor in memory at a time. Goes to a temporary file beside ``path``, renamed into
    place when complete, so ``path`` is never half written."""
    path = Path(path)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)) + blob)
            for name, (shape, dtype) in specs.items():
                tensor = read(name)
                if tensor.shape != shape or tensor.dtype != dtype:
                    raise ValueError(f"{name}: read {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"the header says {tuple(shape)} {dtype}")
                # little-endian raw bytes, as the format stores them (x86 and ARM hosts)
                handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync(path.parent)  # the rename itself survives a crash
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class LoadPlan:
    """How a reader's tensors map onto a model's: copied whole, grown (a position table
    with more rows: trained rows kept, new rows at the model's own initial values), left
    at the model's initial values (missing but allowed), or not fitting."""

    copy: list[str] = field(default_factory=list)
    grow: dict[str, tuple[torch.Size, torch.Size]] = field(default_factory=dict)
    allowed: list[str] = field(default_factory=list)    # missing/unexpected, but allowed
    missing: list[str] = field(default_factory=list)    # in the model, not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model
    mismatched: dict[str, tuple[torch.Size, torch.Size]] = field(default_factory=dict)

    def problems(self, source: str) -> list[str]:
        """Every misfit, naming the tensors (and both shapes); empty if it loads."""
        found = [f"{name} has shape {tuple(saved)} in {source} but {tuple(wanted)} in the "
                 f"model" for name, (saved, wanted) in list(self.mismatched.items())[:5]]
        if len(self.mismatched) > 5:
            found.append(f"{len(self.mismatched) - 5} more tensors of other shapes")
        for names, where in ((self.missing, f"model tensors missing from {source}"),
                             (self.unexpected, f"tensors of {source} not in the model")):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                found.append(f"{len(names)} {where}: {', '.join(names[:5])}{more}")
        return found


def _growable(model: nn.Module, name: str, saved: torch.Size, wanted: torch.Size) -> bool:
    """Only position tables grow, along their rows (more T/H/W patches)."""
    owner = model.get_submodule(name.rpartition(".")[0])
    return (isinstance(owner, PositionEmbedding) and len(saved) == len(wanted) == 2
            and saved[1] == wanted[1] and saved[0] < wanted[0])


def plan_load(model: nn.Module, specs: dict[str, Spec], allow_missing: Iterable[str] = (),
              grow: bool = True) -> LoadPlan:
    """Compare a reader's ``specs`` with the model's state (names and full shapes);
    ``allow_missing``: fnmatch patterns of names that may be absent on either side;
    ``grow``: whether position tables may grow (else every shape must match)."""
    patterns = list(allow_missing)
    state = model.state_dict(keep_vars=True)
    plan = LoadPlan()
    for name in sorted(set(state) | set(specs)):
        if name not in specs or name not in state:
            if any(fnmatch(name, pattern) for pattern in patterns):
                plan.allowed.append(name)
            else:
                (plan.missing if name in state else plan.unexpected).append(name)
            continue
        saved, wanted = specs[name][0], state[name].shape
        if saved == wanted:
            plan.copy.append(name)
        elif grow and _growable(model, name, saved, wanted):
            plan.grow[name] = (saved, wanted)
        else:
            plan.mismatched[name] = (saved, wanted)
    return plan


@torch.no_grad()
def load_local_shards(model: nn.Module, source: CheckpointWeights | SafetensorsWeights,
                      plan: LoadPlan) -> None:
    """Fill the model (built on meta, sharded, then ``to_empty``) with only this rank's
    part of every tensor, without collectives: a sharded tensor is assembled from the
    saved chunks that overlap its shard (from a safetensors file, the shard's bytes
    only), never whole. The plan must copy every tensor (``plan_load(..., grow=False)``
    without problems)."""
    if plan.grow or plan.allowed:
        raise ValueError("load_local_shards copies tensors whole-shaped only; plan with "
                         "grow=False and no allowed-missing names")
    state = model.state_dict(keep_vars=True)
    source.load_local({name: state[name] for name in plan.copy})


@torch.no_grad()
def load_weights(model: nn.Module, read: Callable[[str], torch.Tensor], plan: LoadPlan,
                 seed: int) -> None:
    """Fill the model per ``plan``, one full tensor at a time; under a mesh every rank
    reads the full tensor and keeps its own shard (no communication), as
    ``materialise`` does for initial values. ``seed``: the model's init seed (new rows)."""
    state = model.state_dict(keep_vars=True)
    for name in [*plan.copy, *plan.grow]:
        target = state[name]
        full = read(name)
        if name in plan.grow:
            grown = initial_value(model, name, target.shape, seed)
            grown[: full.shape[0]] = full
            full = grown
        full = full.to(target.device, target.dtype)
        if isinstance(target, DTensor):
            full = distribute_tensor(full, target.device_mesh, target.placements,
                                     src_data_rank=None)
        target.copy_(full)
