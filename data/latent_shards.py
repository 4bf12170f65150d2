"""Cached latents and text encodings (``data=latents``): shards written by
``python -m trainer.precompute`` read as training batches, so the step runs no decoder,
autoencoder or frozen text encoder (arXiv 2410.13720 §6).

Cache format, one shard per raw shard with the same file name and sample order:
``KEY.safetensors`` holds ``latent`` (C, T', H', W') (a preference pair: ``latent_win``
and ``latent_lose``, data/preference_shards.py) and, per text encoder ``NAME``,
``text.NAME.states`` (L, E) and ``text.NAME.mask`` (L,) bool; ``KEY.json`` holds the raw
sample's metadata with ``caption`` (as encoded: the FPS tag included), ``fps``,
``bucket`` [T, H, W] (the pixel bucket the raw shards put the sample in), ``latent_shape``
and ``weight``. The folder also holds ``null_text.safetensors`` (the encoders' output for
the empty caption, for caption dropout) and ``cache.json`` (what wrote the cache).

Order, rank/worker split, bucket grouping, weights and resume are VideoShards' own: only
the per-sample load and the collation differ. A batch is {latent (B, C, T', H', W'),
text {NAME: (states (B, L, E), mask (B, L))}, fps (B,), caption, key, bucket}.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from data.buckets import Bucket
from data.decode import Skip
from data.shards import VideoShards, WebDatasetConfig, expand_shards, read_meta

NULL_TEXT = "null_text.safetensors"
MANIFEST = "cache.json"
Encoded = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (states, mask)


def text_tensors(text: Encoded) -> dict[str, torch.Tensor]:
    """One sample's {name: (states (L, E), mask (L,))} -> flat safetensors names."""
    tensors = {}
    for name, (states, mask) in text.items():
        tensors[f"text.{name}.states"] = states.contiguous()
        tensors[f"text.{name}.mask"] = mask.contiguous()
    return tensors


def pack_sample(latents: dict[str, torch.Tensor], text: Encoded) -> bytes:
    """{name: latent (C, T', H', W')} (``latent``, or a pair's ``latent_win`` and
    ``latent_lose``) and one sample's text encodings -> safetensors bytes."""
    return save({**{name: latent.contiguous() for name, latent in latents.items()},
                 **text_tensors(text)})


def unpack_text(tensors: dict[str, torch.Tensor]) -> Encoded:
    """{"text.NAME.states": ..., "text.NAME.mask": ...} -> {NAME: (states, mask)}."""
    names = [key[len("text."):-len(".states")] for key in tensors
             if key.startswith("text.") and key.endswith(".states")]
    return {name: (tensors[f"text.{name}.states"], tensors[f"text.{name}.mask"])
            for name in sorted(names)}


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one bucket -> latent (B, C, T', H', W') (each of a pair's latents), text
    {name: (states (B, L, E), mask (B, L))}, fps (B,), caption, key."""
    names = samples[0]["text"]
    latents = [name for name in samples[0] if name.startswith("latent")]
    return {
        **{name: torch.stack([s[name] for s in samples]) for name in latents},
        "text": {name: (torch.stack([s["text"][name][0] for s in samples]),
                        torch.stack([s["text"][name][1] for s in samples])) for name in names},
        "fps": torch.tensor([float(s["fps"]) for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class LatentShards(VideoShards):
    """VideoShards over cache shards: batches of latents and text encodings."""

    collate = staticmethod(collate_latents)
    latent_names: tuple[str, ...] = ("latent",)  # the latents each sample holds

    def load_sample(self, key: str, members: dict[str, bytes],
                    epoch: int) -> tuple[dict[str, Any] | None, int]:
        """(sample {latent, text, fps, caption, key, bucket}, copies this epoch); (None, 0)
        when the weight drops it, unread. Raises Skip on bad data."""
        meta = read_meta(members)
        if "safetensors" not in members or not isinstance(meta.get("caption"), str):
            raise Skip("not_a_cache_sample", f"members {sorted(members)}; write cache "
                                             f"shards with python -m trainer.precompute")
        copies = self.copies(key, meta, epoch)
        if not copies:
            return None, 0
        try:
            bucket = Bucket(*(int(n) for n in meta["bucket"]))
            tensors = load(members["safetensors"])
            latents = {name: tensors[name] for name in self.latent_names}
            text = unpack_text(tensors)
        except (KeyError, TypeError, ValueError, SafetensorError) as err:
            raise Skip("bad_cache_sample", repr(err)) from err
        if bucket not in self.grid.shapes():
            raise Skip("bucket_not_in_grid", f"bucket {bucket} is not one of data.sizes x "
                                             f"data.durations")
        return {**latents, "text": text, "fps": meta.get("fps", self.fps),
                "caption": meta["caption"], "key": key, "bucket": bucket}, copies


@dataclass
class LatentDataConfig(WebDatasetConfig):
    """``data=latents``: cache shards instead of raw ones. ``fps``, ``sizes`` and
    ``durations`` must be the ones the cache was written with (checked against its
    ``cache.json`` when training starts); batch sizes, workers and seed are free."""

    shards: str = "cache/{000000..000009}.tar"

    def reader(self) -> type[VideoShards]:
        return LatentShards


def cache_dir(cfg: LatentDataConfig) -> str:
    """The folder of the cache: that of the first training shard."""
    return os.path.dirname(expand_shards(cfg.shards)[0]) or "."


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The cache's ``cache.json`` (what config wrote it), or None if there is none yet."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


def write_atomically(path: str, data: bytes) -> None:
    """Write to ``path + ".tmp"`` and rename: a reader sees no file or the whole one."""
    with open(path + ".tmp", "wb") as file:
        file.write(data)
    os.replace(path + ".tmp", path)


def load_null_text(directory: str) -> Encoded:
    """{name: (states (1, L, E), mask (1, L))}: the encoders' output for the empty caption."""
    path = os.path.join(directory, NULL_TEXT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: trainer.precompute writes it next to the "
                                f"cache shards; data.shards must name a complete cache")
    return {name: (states[None], mask[None])
            for name, (states, mask) in unpack_text(load_file(path)).items()}


class CacheMismatch(ValueError):
    """The config differs from the one a cache was written with; the message names the
    key, both values and the fix."""


def check_frozen_text(text_encoders: Mapping[str, Any]) -> None:
    """Cached encodings are only valid for encoders that never change."""
    for name, node in text_encoders.items():
        if getattr(node, "trainable", False):
            raise CacheMismatch(
                f"text.encoders.{name}.trainable=true: a trainable encoder changes as the "
                f"DiT trains, so its cached output would go stale; set "
                f"text.encoders.{name}.trainable=false, or train from the raw shards "
                f"(data=webdataset) to train it")


def _plain(node: Any) -> Any:
    """A config dataclass (or dict of them) as plain JSON values."""
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(node),
                                                        enum_to_str=True)))


def cache_manifest(data: WebDatasetConfig, autoencoder: Any, text: Any, seed: int,
                   preference: bool) -> dict[str, Any]:
    """Everything that decides the cached values, by the config key that sets it: the
    decode (``data``), the ``autoencoder`` and ``text`` config groups, ``trainer.seed``
    when an encoder takes its values from it, and whether the samples are preference
    pairs."""
    autoencoder = _plain(autoencoder)
    checkpoint = autoencoder.pop("checkpoint", None)
    if checkpoint:  # the weights count, not where the file lies
        with open(checkpoint, "rb") as file:
            autoencoder["checkpoint_sha256"] = hashlib.file_digest(file, "sha256").hexdigest()
    encoders = _plain(text)["encoders"]
    # Only an encoder without pretrained weights takes its values from the seed.
    seeded = any(not hasattr(get_class(node["_target_"]), "pretrained_tensor")
                 for node in encoders.values())
    manifest = {"data.fps": data.fps, "data.sizes": [list(s) for s in data.sizes],
                "data.durations": list(data.durations), "autoencoder": autoencoder,
                "text.encoders": encoders, "trainer.seed": seed if seeded else None}
    if preference:  # only then: caches written before pairs existed stay valid
        manifest["data.preference"] = True
    return manifest


def compare_manifest(current: dict, written: dict, what: str, fix: str) -> None:
    """Raise CacheMismatch at the first key whose value differs from the written one."""
    for key, value in current.items():
        if written.get(key) != value:
            raise CacheMismatch(f"{key}={value} but {what} was written with {key}="
                                f"{written.get(key)}; {fix}")


def check_cache(data: LatentDataConfig, current: dict) -> None:
    """Training from a cache (``data=latents``): ``current`` (``cache_manifest`` of the
    run's config) must be what the cache was written with, else the DiT would learn from
    encodings its own encoders do not give."""
    directory = cache_dir(data)
    written = read_manifest(directory)
    if written is None:
        raise CacheMismatch(f"data.shards={data.shards!r} lies in {directory}, which has no "
                            f"{MANIFEST}: it is not a cache written by trainer.precompute")
    compare_manifest(current, written, f"the cache in {directory}",
                     "train with those values, or precompute a new cache with this config")
