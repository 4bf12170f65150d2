"""Apply parallelism and memory/speed switches to a built (possibly meta) DiT, from outside.

The torchtitan pattern: the model file defines the math, this file decides how it runs.
Today: activation checkpointing (none / full / every k-th block) and per-block
torch.compile; the mesh-based plans plug in here.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from models.dit import DiT


def apply_activation_checkpointing(dit: DiT, mode: str, every: int = 1) -> None:
    """Recompute checkpointed blocks' activations in backward. mode: none | full | every_k.

    The composable ``checkpoint`` keeps parameter names, so checkpoints, EMA and optimizer
    state are the same with the switch on or off.
    """
    if mode == "none":
        return
    stride = 1 if mode == "full" else every
    for index, block in enumerate(dit.blocks):
        if index % stride == 0:
            checkpoint(block)


def compile_blocks(dit: DiT) -> None:
    """Compile every block separately: one graph per block type, shared by all of them."""
    for block in dit.blocks:
        block.compile()


def parallelize_dit(dit: nn.Module, activation_checkpointing: str, checkpoint_every: int,
                    compile: bool) -> None:
    apply_activation_checkpointing(dit, activation_checkpointing, checkpoint_every)
    if compile:
        compile_blocks(dit)
