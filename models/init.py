"""Parameter initialisation as a function of (seed, parameter name) only.

A parameter's initial value never depends on the order parameters are visited or on how
the model is sharded, so the parallel layer can materialise a sharded model one parameter
at a time (never holding the whole model) and get exactly the single-process weights.

Rules by owning module: Linear weights truncated normal (std 0.02), norm weights 1 and
biases 0, convolution weights normal with std 1/sqrt(fan_in) (a fixed 0.02 would shrink
the signal through a deep conv stack), embeddings and bare tables normal (std 0.02).
A module with an ``initial_value(name, shape)`` method gives its own parameters' start
(a structured position table) unless it returns None.
A module lists parameters that start at zero (adaLN-zero, the TAE's temporal residual
convolutions and friends) in ``zero_init``: fnmatch patterns relative to it.
"""

from __future__ import annotations

import zlib
from fnmatch import fnmatch

import torch
from torch import nn

STD = 0.02


def parameter_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _pretrained_owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The outermost module above ``name`` that holds pretrained weights, and the name
    relative to it; (None, name) when there is none."""
    parts = name.split(".")
    for split in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:split]))
        if hasattr(owner, "pretrained_tensor"):
            return owner, ".".join(parts[split:])
    return None, name


def _starts_at_zero(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for split in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:split]))
        relative = ".".join(parts[split:])
        if any(fnmatch(relative, pattern) for pattern in getattr(owner, "zero_init", ())):
            return True
    return False


@torch.no_grad()
def initial_value(model: nn.Module, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of ``model``'s parameter ``name``, on CPU: fp32,
    or the saved tensor in its saved dtype for a pretrained module's parameter."""
    pretrained, relative = _pretrained_owner(model, name)
    if pretrained is not None:
        return pretrained.pretrained_tensor(relative, shape)
    module_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_path)
    structured = getattr(owner, "initial_value", None)
    if structured is not None and (table := structured(attr, shape)) is not None:
        return table
    value = torch.empty(shape)
    generator = parameter_generator(seed, name)
    if _starts_at_zero(model, name) or attr == "bias":
        return value.zero_()
    if isinstance(owner, (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm)):
        return value.fill_(1.0)
    if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        fan_in = shape[1:].numel()
        return nn.init.normal_(value, std=fan_in ** -0.5, generator=generator)
    if isinstance(owner, nn.Linear):
        return nn.init.trunc_normal_(value, std=STD, generator=generator)
    return nn.init.normal_(value, std=STD, generator=generator)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of an unsharded model in place (works after to_empty)."""
    for name, param in model.named_parameters():
        param.copy_(initial_value(model, name, param.shape, seed))
