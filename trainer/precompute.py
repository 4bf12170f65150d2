"""``python -m trainer.precompute output=cache/ [training overrides ...]``: encode raw video
shards once into cached latents and text encodings (``data=latents``, arXiv 2410.13720 §6).

The overrides are those of the training run (``experiment=... data=webdataset
data.shards=... autoencoder=... text=...``), composed from ``conf/train.yaml``, so the
cache holds exactly what that run would compute in its step: the training decode (buckets,
fps, resize/crop), the frozen autoencoder and the frozen text encoders with the weights of
``trainer.seed`` (or their pretrained files), under ``trainer.precision``. Options of its
own: ``output=`` (the cache folder, required) and ``batch=`` (samples encoded together,
default 16). With ``data=preference`` the shards hold preference pairs and both sides
are encoded (``latent_win``, ``latent_lose``; train with ``data=preference_latents``).

One cache shard per raw shard, same file name, same sample order; bad samples are skipped
and counted. Under torchrun rank r of W takes raw shards r, r + W, ... A cache shard that
exists is complete (``write_shard`` renames it into place), so a restart skips it.
``cache.json`` records the config that wrote the cache: a restart with another one is
refused, and training from the cache checks its config against it
(``data.latent_shards.check_cache``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save
from tqdm import tqdm

from data.decode import Skip
from data.latent_shards import (
    MANIFEST,
    NULL_TEXT,
    CacheMismatch,
    LatentDataConfig,
    compare_manifest,
    pack_sample,
    read_manifest,
    text_tensors,
    write_atomically,
)
from data.shards import VideoShards, WebDatasetConfig, read_meta, write_shard
from data.tars import TarReadError, check_tar
from models.init import initial_value
from models.text import TextConditioner
from parallel.mesh import MeshDims, init_parallel, shutdown
from trainer.build import build_autoencoder, build_meta_model
from trainer.config import ConfigError, TrainConfig, to_train_config
from trainer.precision import autocast
from trainer.start_checks import check_latent_fits, check_text_frozen, manifest_of

log = logging.getLogger(__name__)
USAGE = "python -m trainer.precompute output=DIR [batch=16] [training overrides ...]"


@torch.no_grad()
def build_frozen_text(cfg: TrainConfig, device: torch.device) -> TextConditioner:
    """The text conditioner whose encoders hold exactly the training run's values: built on
    meta like the training model, each encoder parameter filled with its initial value for
    (``trainer.seed``, full parameter name) or read from its pretrained file. Only
    ``encode`` may be called: the projections stay on meta."""
    check_text_frozen(cfg)
    model = build_meta_model(cfg)
    encoders = model.text.encoders.to_empty(device=device)
    for name, param in encoders.named_parameters(prefix="text.encoders"):
        param.copy_(initial_value(model, name, param.shape, cfg.trainer.seed).to(param.dtype))
    return model.text.eval()


class Encoder:
    """Raw samples -> cache samples with the frozen autoencoder and text encoders."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.autoencoder = build_autoencoder(cfg, device)
        check_latent_fits(cfg, self.autoencoder)
        self.text = build_frozen_text(cfg, device)

    @torch.no_grad()
    def text_of(self, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with autocast(self.cfg, self.device):
            encoded = self.text.encode(captions)
        return {name: (s.cpu(), m.cpu()) for name, (s, m) in encoded.items()}

    @torch.no_grad()
    def __call__(self, chunk: list[tuple[dict, dict]]) -> list[dict[str, Any]]:
        """[(raw metadata, decoded sample)] -> [cache sample for write_shard], in order.
        Samples of one bucket are encoded together (one shape, one batch)."""
        if not chunk:
            return []
        text = self.text_of([sample["caption"] for _, sample in chunk])
        # "video" -> "latent"; a preference pair's "video_win" -> "latent_win", ...
        names = [name for name in chunk[0][1] if name.startswith("video")]
        latents: list[dict[str, torch.Tensor]] = [{} for _ in chunk]
        by_bucket: dict[Any, list[int]] = {}
        for index, (_, sample) in enumerate(chunk):
            by_bucket.setdefault(sample["bucket"], []).append(index)
        for indices, name in ((i, n) for i in by_bucket.values() for n in names):
            video = torch.stack([chunk[i][1][name] for i in indices]).to(self.device)
            with autocast(self.cfg, self.device):
                encoded = self.autoencoder.encode(video).cpu()
            for index, latent in zip(indices, encoded, strict=True):
                latents[index]["latent" + name[len("video"):]] = latent
        out = []
        for index, (meta, sample) in enumerate(chunk):
            bucket, latent = sample["bucket"], next(iter(latents[index].values()))
            row = {name: (s[index], m[index]) for name, (s, m) in text.items()}
            out.append({"__key__": sample["key"],
                        "safetensors": pack_sample(latents[index], row),
                        "json": {**meta, "caption": sample["caption"], "fps": sample["fps"],
                                 "bucket": [bucket.frames, bucket.height, bucket.width],
                                 "latent_shape": list(latent.shape),
                                 "weight": meta.get("weight", 1.0)}})
        return out


def cache_samples(url: str, reader: VideoShards, encoder: Encoder, batch: int,
                  counts: Counter) -> Iterator[dict[str, Any]]:
    """The cache samples of raw shard ``url``, in its order; skips counted in ``counts``.
    Raises TarReadError when the shard cannot be read to its end."""
    if os.path.isfile(url):  # a copy cut at a member boundary reads as a complete tar
        check_tar(url)
    broken = counts["bad_shard"]
    chunk: list[tuple[dict, dict]] = []
    for _, key, members in reader.read_shard(url, counts):
        try:
            if isinstance(members, Skip):  # dropped unread: too_large, duplicate_key
                raise members
            sample, _ = reader.load_sample(key, members, epoch=0)
            chunk.append((read_meta(members), sample))
        except Skip as skip:
            counts[skip.reason] += 1
            log.warning("skipping sample %s of shard %s: %s", key, url, skip)
        except Exception:  # a decoder failing in a way not foreseen
            counts["decode_error"] += 1
            log.exception("skipping sample %s of shard %s", key, url)
        if len(chunk) == batch:
            yield from encoder(chunk)
            counts["samples_written"] += len(chunk)
            chunk = []
    if counts["bad_shard"] > broken:
        raise TarReadError(f"{url}: unreadable before its end (the warning above says where)")
    yield from encoder(chunk)
    counts["samples_written"] += len(chunk)


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def precompute(cfg: TrainConfig, output: str, batch: int = 16) -> Counter:
    """Write this rank's cache shards into ``output``; the summary over all ranks (on
    every rank): samples and shards written, shards found done, skips by reason."""
    if not isinstance(cfg.data, WebDatasetConfig) or isinstance(cfg.data, LatentDataConfig):
        raise ConfigError("trainer.precompute encodes raw video shards: pick data=webdataset "
                          "(or data=preference for preference pairs) with data.shards naming "
                          "them")
    if batch < 1:
        raise ConfigError(f"batch={batch} must be >= 1")
    ctx = init_parallel(MeshDims(), torch.device(cfg.trainer.device).type)
    try:
        # every sample once (weights apply in training); preference shards read as pairs
        reader = cfg.data.dataset(cfg.data.shards, "data.shards", weighted=False)
        names = [shard_name(url) for url in reader.urls]
        if len(set(names)) < len(names):
            raise ConfigError(f"data.shards={cfg.data.shards!r} names two shards with one file "
                              f"name; the cache keeps the names, so they would collide")
        os.makedirs(output, exist_ok=True)
        manifest = manifest_of(cfg)
        written = read_manifest(output)
        if written is not None:
            try:
                compare_manifest(manifest, written, f"output={output}", "use a new output folder")
            except CacheMismatch as error:
                raise ConfigError(str(error)) from None
        encoder = Encoder(cfg, ctx.device)
        if ctx.is_main:
            null = {name: (s[0], m[0]) for name, (s, m) in encoder.text_of([""]).items()}
            write_atomically(os.path.join(output, NULL_TEXT), save(text_tensors(null)))
            write_atomically(os.path.join(output, MANIFEST),
                             json.dumps(manifest, indent=1).encode())
        counts: Counter = Counter()
        mine = list(zip(reader.urls, names, strict=True))[ctx.rank::ctx.world_size]
        bar = tqdm(mine, desc="precompute", unit="shard",
                   disable=not (ctx.is_main and cfg.trainer.progress))
        for url, name in bar:
            path = os.path.join(output, name)
            if os.path.exists(path):
                counts["shards_done_before"] += 1
                continue
            shard_counts: Counter = Counter()
            try:  # write_shard renames only a complete shard into place
                write_shard(path, cache_samples(url, reader, encoder, batch, shard_counts))
            except TarReadError as err:  # nothing published: a restart tries it again
                counts["shard_errors"] += 1
                log.error("cache shard %s not written: %s", name, err)
                continue
            counts.update(shard_counts)
            counts["shards_written"] += 1
            bar.set_postfix(samples=counts["samples_written"])
        return sum((Counter(c) for c in ctx.gather_objects(dict(counts))), Counter())
    finally:
        shutdown(ctx)


def summary_table(counts: Counter) -> str:
    order = ["shards_written", "shards_done_before", "shard_errors", "samples_written"]
    rows = [(k, counts[k]) for k in order] + sorted(
        (f"skipped {k}", v) for k, v in counts.items() if k not in order)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)


def main(argv: list[str]) -> None:
    from trainer.config import register_configs
    from trainer.run_config import CONF_DIR

    options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv
               if a.split("=", 1)[0] in ("output", "batch")}
    overrides = [a for a in argv if a.split("=", 1)[0] not in options]
    if "output" not in options:
        raise SystemExit(f"trainer.precompute: output= is required (usage: {USAGE})")
    try:
        register_configs()
        with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
            cfg = to_train_config(compose("train", overrides=overrides))
        counts = precompute(cfg, options["output"], int(options.get("batch", 16)))
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary_table(counts), flush=True)
    if counts["shard_errors"]:
        raise SystemExit(f"trainer.precompute: {counts['shard_errors']} raw shards could not "
                         f"be read to their end (named in the log above); their cache shards "
                         f"were not written: repair or replace them and rerun")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
