"""Shared setup of the parallel benches: a composed config, the model on a mesh, and two
dispatch-level meters (live tensor bytes, bytes saved for backward).

Everything runs the product path: ``trainer.build.build_model`` (meta model ->
``parallelize_model`` -> ``materialise``) on the mesh ``trainer.train.start_parallel`` makes
from the config, inside gloo processes spawned by ``tests.distributed.run_distributed``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

CORES = 2  # the machine's cores: the ranks of one run share them
TINY_TEXT = ["text.encoders.byte.dim=32", "text.encoders.byte.depth=1",
             "text.encoders.byte.heads=2", "text.encoders.byte.ffn_dim=64",
             "text.encoders.byte.max_length=16", "trainer.wandb.mode=disabled"]


def compose(overrides: list[str]):
    """The validated TrainConfig of ``experiment=t2v_tiny`` plus ``overrides``, on the
    per-frame ``model=dit_tiny`` unless they pick a model: the benches' latents have any
    frame count, and t2v_tiny's own tokens span 8 frames."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainer.config import register_configs, to_train_config
    from trainer.run_config import CONF_DIR

    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        model = [] if any(o.startswith("model=") for o in overrides) else ["model=dit_tiny"]
        return to_train_config(hydra_compose("train", overrides=["experiment=t2v_tiny",
                                                                 *model, *overrides]))


def start(cfg, world: int):
    """This rank's ParallelContext and model, with the machine's cores split over the ranks."""
    from trainer.build import build_model
    from trainer.train import start_parallel

    torch.set_num_threads(max(1, CORES // world))
    ctx = start_parallel(cfg)
    return ctx, build_model(cfg, ctx)


def video_batch(cfg, seed: int = 0) -> torch.Tensor:
    """The global batch of pixel videos in [-1, 1], the same on every rank."""
    data = cfg.data
    shape = (cfg.recipe.batch_size, 3, data.frames, data.height, data.width)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops allocate while the mode is on and that
    are still alive (activations, temporaries, gradients, communication buffers).

    A storage counts from the op that creates it until Python frees it. Storages that
    existed before (parameters, inputs) never count, nor do allocations inside a kernel."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._tracked.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Let DTensor dispatch first (as parallel.comm_counter.CommCounter does), so the
        # mode stays on and sees the local ops DTensor runs, and what they allocate.
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked or storage.nbytes() == 0:
                continue  # a view or in-place result, or already counted
            self._tracked[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


def _tensors(tree):
    """Plain CPU tensors and parameters in a nest of tuples/lists/dicts (fake and meta
    tensors skipped): a view of a parameter (``weight.t()`` in a linear) is no new storage."""
    if type(tree) in (torch.Tensor, torch.nn.Parameter):
        if tree.device.type != "meta":
            yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class SavedBytes:
    """Bytes saved for backward while active: the unique storages autograd packs, leaving
    out parameters and views of them (FSDP's gathered weights are parameters too). This
    is the activation memory proper; at the end of the forward all of it is alive.
    ``by_region[region]`` splits the total by the caller-set ``region``."""

    def __init__(self):
        self.total = 0
        self.region = "other"
        self.by_region: Counter[str] = Counter()
        self._seen: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if not isinstance(base, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            if storage not in self._seen:
                self._seen.add(storage)
                self.total += storage.nbytes()
                self.by_region[self.region] += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def measured_step(cfg, ctx, model) -> dict[str, float]:
    """One forward + flow-matching loss + backward (no optimizer) of the config's batch under
    the meters: bytes saved inside the DiT blocks and in all, peak live bytes, RSS, time."""
    from trainer.build import build_autoencoder, build_flow
    from trainer.draws import StepDraws
    from trainer.objective import flow_matching_loss

    autoencoder, flow = build_autoencoder(cfg, ctx.device), build_flow(cfg)
    video = video_batch(cfg)
    captions = ["a red square moving left"] * video.shape[0]
    saved = SavedBytes()
    for block in model.dit.blocks:
        block.register_forward_pre_hook(lambda *_: setattr(saved, "region", "blocks"))
        block.register_forward_hook(lambda *_: setattr(saved, "region", "other"))
    gc.collect()
    rss_before = rss_mib()
    began = time.perf_counter()
    with LiveBytes() as live, saved:
        loss = flow_matching_loss(model, autoencoder, flow, video, captions,
                                  StepDraws(0, 1, ctx.device))
        loss.backward()
    return {"seconds": time.perf_counter() - began, "saved_blocks": saved.by_region["blocks"],
            "saved": saved.total, "live": live.peak, "rss_before": rss_before,
            "rss_peak": peak_rss_mib()}


def rss_mib() -> float:
    """Current resident set size of this process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def run_point(script: str, overrides: list[str], steps: int) -> dict[str, float]:
    """Run ``script --point '[overrides, steps]'`` in a fresh process (so each row's peak
    RSS and allocator state are its own) -> the JSON dict of its last stdout line."""
    result = subprocess.run([sys.executable, script, "--point", json.dumps([overrides, steps])],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"point {overrides} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
