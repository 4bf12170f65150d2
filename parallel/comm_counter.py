"""Count the bytes this rank sends, per collective kind, by watching the dispatcher.

``CommCounter`` is a TorchDispatchMode. Under ``with CommCounter() as counter:`` it sees the
collectives this process issues, in forward and in backward: ``torch.distributed`` calls
arrive as ``c10d.*`` ops and DTensor's redistributions as ``_c10d_functional.*`` ops.
Checked on gloo/CPU with torch 2.13 (tests/test_context_parallel.py): our context-parallel
attention, FSDP2 (``fully_shard``: c10d all-gather in forward, reduce-scatter in backward)
and DTensor ``distribute_tensor``/``redistribute`` (c10d scatter, functional all-gather),
including the redistributions DTensor performs implicitly inside an op.
Other ``torch.distributed`` users (DDP, ``deepspeed.comm``) take the same c10d path;
torch.compile'd graphs are not checked.

Bytes sent, n = group size, the payload leaving this rank under bandwidth-optimal algorithms:
  all_gather       input x (n-1)          (this rank's chunk reaches every peer)
  reduce_scatter   input x (n-1)/n        (every chunk but its own leaves)
  all_reduce       input x 2(n-1)/n       (reduce-scatter then all-gather)
  all_to_all       the input rows addressed to other ranks
  send             the tensor
Every collective op is also counted in ``calls`` (by kind, or by op name for the ones
without a modelled volume: recv, broadcast, scatter, barrier, ...).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.distributed import ProcessGroup
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

# op name (in c10d or _c10d_functional) -> (kind, the argument holding what this rank sends)
_OPS = {
    "_allgather_base_": ("all_gather", "input_tensor"),
    "allgather_": ("all_gather", "input_tensors"),
    "allgather_into_tensor_coalesced_": ("all_gather", "inputs"),
    "all_gather_into_tensor": ("all_gather", "input"),
    "all_gather_into_tensor_out": ("all_gather", "input"),
    "all_gather_into_tensor_coalesced": ("all_gather", "inputs"),
    "_reduce_scatter_base_": ("reduce_scatter", "input_tensor"),
    "reduce_scatter_": ("reduce_scatter", "input_tensors"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "inputs"),
    "allreduce_": ("all_reduce", "tensors"),
    "allreduce_coalesced_": ("all_reduce", "tensors"),
    "all_reduce": ("all_reduce", "input"),
    "all_reduce_": ("all_reduce", "input"),
    "all_reduce_coalesced": ("all_reduce", "inputs"),
    "alltoall_base_": ("all_to_all", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "alltoall_": ("all_to_all", "input_tensors"),
    "send": ("send", "tensors"),
}
_NAMESPACES = ("c10d", "_c10d_functional")
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(item) for item in value)


def _group(args: dict) -> ProcessGroup:
    group = args.get("process_group", args.get("group_name"))
    if isinstance(group, str):  # functional collectives name their group
        return _resolve_process_group(group)
    if isinstance(group, torch.ScriptObject):  # c10d ops carry it boxed
        return ProcessGroup.unbox(group)
    return group


def _sent_bytes(kind: str, payload_arg: str, args: dict) -> int:
    group = _group(args)
    n, payload = group.size(), _nbytes(args[payload_arg])
    if kind == "all_gather":
        return payload * (n - 1)
    if kind == "reduce_scatter":
        return payload * (n - 1) // n
    if kind == "all_reduce":
        return 2 * payload * (n - 1) // n
    if kind == "send":
        return payload
    # all_to_all: everything but the part addressed to this rank
    if payload_arg == "input_tensors":
        return payload - _nbytes(args[payload_arg][group.rank()])
    tensor, splits = args[payload_arg], args["input_split_sizes"]
    if not splits:
        return payload * (n - 1) // n
    return payload - payload // tensor.size(0) * splits[group.rank()]


class CommCounter(TorchDispatchMode):
    """Bytes sent (``sent[kind]``) and calls (``calls[kind or op name]``) of this rank's
    collectives while the mode is active; see the module docstring for what counts."""

    def __init__(self):
        super().__init__()
        self.sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # A mode runs before tensor subclasses and is off while the op it intercepted runs,
        # so the collectives DTensor issues inside its own dispatch (implicit
        # redistributions, e.g. a Partial gradient reduced inside an optimizer op) would
        # never reach it: let DTensor dispatch first, this mode then sees its local ops.
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        if func.namespace in _NAMESPACES and func._opname not in _NOT_COLLECTIVES:
            if func._opname in _OPS:
                kind, payload_arg = _OPS[func._opname]
                # trailing arguments left at their defaults are absent from args
                schema = func._schema.arguments
                named = {arg.name: value for arg, value in zip(schema, args, strict=False)}
                named.update(kwargs)
                self.sent[kind] += _sent_bytes(kind, payload_arg, named)
                self.calls[kind] += 1
            else:
                self.calls[func._opname] += 1
        return func(*args, **kwargs)
