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

Random values are drawn in tiles of up to TILE rows x TILE columns (dims 0 and 1,
trailing dims whole; a 1-D parameter in runs of up to TILE**2), each from its own
generator keyed by (seed, name, tile), so a rank whose shard is a block of the parameter
draws only the tiles that block overlaps (about its share, plus partial tiles at the
block's edges) and still gets exactly the values of the whole-parameter draw.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial

import torch
from torch import nn

STD = 0.02
TILE = 128  # a tile is TILE x TILE: 16K fp32 values, below ATen's parallel grain size
Index = tuple[slice, ...]  # a block of a tensor: one contiguous slice per dim


@dataclass
class DrawTally:
    """Elements drawn from init generators (not constants, tables or pretrained values)."""

    elements: int = 0


def tile_generator(seed: int, name: str, tile: tuple[int, ...]) -> torch.Generator:
    # blake2b, not hash(): Python salts str hashes per process
    digest = hashlib.blake2b(f"{seed}/{name}/{tile}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _tile_extent(shape: torch.Size) -> tuple[int, ...]:
    """A tile's size along the tiled dims (dim 0, and dim 1 when there is one): at most
    TILE (TILE**2 for a 1-D parameter), and a 16th of the dim or less, so shards of up
    to 16 ways of a small parameter do not each draw it whole."""
    limit = TILE * TILE if len(shape) == 1 else TILE
    return tuple(min(limit, max(1, -(-size // 16))) for size in shape[:2])


def block_shape(shape: torch.Size, index: Index) -> tuple[int, ...]:
    return tuple(len(range(*part.indices(size))) for part, size in zip(index, shape, strict=True))


def _drawn(shape: torch.Size, index: Index, seed: int, name: str,
           draw: Callable[..., torch.Tensor],
           tally: DrawTally) -> torch.Tensor:
    """The block ``index`` of the parameter whose tiles ``draw(tile, generator=...)``
    fills in place, drawing only the tiles the block overlaps."""
    out = torch.empty(block_shape(shape, index))
    extent = _tile_extent(shape)
    ranges = [range(*part.indices(size)) for part, size in zip(index, shape, strict=True)]
    tiled = ranges[:len(extent)]
    if any(len(r) == 0 for r in ranges):
        return out
    per_dim = [range(r.start // e, (r.stop - 1) // e + 1)
               for r, e in zip(tiled, extent, strict=True)]
    sizes, trailing = shape[:len(extent)], tuple(index[len(extent):])
    for tile in itertools.product(*per_dim):
        # per tiled dim: the tile's [start, stop) in the parameter, then its overlap with
        # the block
        bounds = [(t * e, min(t * e + e, size))
                  for t, e, size in zip(tile, extent, sizes, strict=True)]
        values = draw(torch.empty((*(b - a for a, b in bounds), *shape[len(extent):])),
                      generator=tile_generator(seed, name, tile))
        tally.elements += values.numel()
        overlap = [(max(r.start, a), min(r.stop, b))
                   for r, (a, b) in zip(tiled, bounds, strict=True)]
        source = tuple(slice(lo - a, hi - a)
                       for (lo, hi), (a, _) in zip(overlap, bounds, strict=True))
        target = tuple(slice(lo - r.start, hi - r.start)
                       for (lo, hi), r in zip(overlap, tiled, strict=True))
        out[target] = values[source + trailing]
    return out


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
def initial_value(model: nn.Module, name: str, shape: torch.Size, seed: int,
                  index: Index | None = None, tally: DrawTally | None = None) -> torch.Tensor:
    """The initial value of ``model``'s parameter ``name`` (full shape ``shape``) on CPU:
    fp32, or the saved tensor in its saved dtype for a pretrained module's parameter.
    ``index``: only that block of it (the whole parameter when None); random values are
    then drawn for that block's tiles only, counted in ``tally``."""
    index = tuple(slice(None) for _ in shape) if index is None else tuple(index)
    tally = DrawTally() if tally is None else tally
    pretrained, relative = _pretrained_owner(model, name)
    if pretrained is not None:
        return pretrained.pretrained_tensor(relative, shape)[index]
    module_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_path)
    structured = getattr(owner, "initial_value", None)
    if structured is not None and (table := structured(attr, shape)) is not None:
        return table[index]
    if _starts_at_zero(model, name) or attr == "bias":
        return torch.zeros(block_shape(shape, index))
    if isinstance(owner, (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm)):
        return torch.ones(block_shape(shape, index))
    if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        std = shape[1:].numel() ** -0.5  # of the full fan-in, whatever block is drawn
        draw = partial(nn.init.normal_, std=std)
    elif isinstance(owner, nn.Linear):
        draw = partial(nn.init.trunc_normal_, std=STD)
    else:
        draw = partial(nn.init.normal_, std=STD)
    return _drawn(shape, index, seed, name, draw, tally)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of an unsharded model in place (works after to_empty)."""
    for name, param in model.named_parameters():
        param.copy_(initial_value(model, name, param.shape, seed))
