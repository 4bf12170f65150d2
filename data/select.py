"""Pick a fine-tuning set from curated shards: ``python -m data.select
input='curated/{000000..000099}.tar' output=sft/ top=2000 val=100 score.sharpness=1
score.motion=1 [score.text_area=-1] [shard_size=100] [seed=0]``.

Quality tuning trains on a few thousand of the best clips (arXiv 2309.15807,
2410.13720). The curation job (``python -m data.curate``) writes every filter's score into
each kept clip's json (``scores``: motion, sharpness, text_area, ...; a model scorer such
as an aesthetics model plugged into the chain as a ``ClipScorer`` adds its own); this
command ranks the clips by a weighted sum of those scores and copies the top ``top`` into
a small set of shards: ``output/train/`` and, ``val`` of them drawn at random (``seed``),
``output/val/`` for early stopping. Scores have different units, so each is first turned
into its rank among the candidates, scaled to [0, 1] (ties share their mean rank); a
negative weight prefers low values. A clip without a finite value for a weighted score
is skipped and counted. The picked clips keep their members; their json gains ``select``
(score, rank) and their curation sampling ``weight`` becomes ``curation_weight``, so each
is used once per epoch. ``output/selection.json`` records the options, the counts and
every pick; the command prints the training overrides that read the new shards.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.curation.job import read_json, write_json
from data.shards import expand_shards, write_shard
from data.sources import open_source
from data.tars import streamed_tar

USAGE = ("python -m data.select input='curated/{000000..000099}.tar' output=sft/ top=2000 "
         "val=100 score.sharpness=1 score.motion=1")
REPORT = "selection.json"


@dataclass
class SelectConfig:
    input: str = ""  # brace pattern of curated shards
    output: str = ""  # folder for train/, val/ and selection.json
    top: int = 0  # clips to pick (train + val)
    val: int = 0  # of those, held out for validation / early stopping
    score: dict[str, float] = field(default_factory=dict)  # score name -> weight
    shard_size: int = 100  # clips per output shard
    seed: int = 0  # which picks are held out


def fail(message: str) -> None:
    raise SystemExit(f"data.select: {message} (usage: {USAGE})")


def parse_options(argv: list[str]) -> SelectConfig:
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SelectConfig),
                                                  OmegaConf.from_cli(argv)))
    except OmegaConfBaseException as err:
        fail(str(err).splitlines()[0])
    for key in ("input", "output"):
        if not getattr(cfg, key):
            fail(f"{key}= is required")
    if cfg.top < 1:
        fail(f"top={cfg.top} must be >= 1 (the number of clips to pick)")
    if not 0 <= cfg.val < cfg.top:
        fail(f"val={cfg.val} must lie in [0, top={cfg.top}) (clips held out of the picks)")
    if cfg.shard_size < 1:
        fail(f"shard_size={cfg.shard_size} must be >= 1")
    if not cfg.score or not any(cfg.score.values()):
        fail("score.NAME=WEIGHT is required, e.g. score.sharpness=1 score.motion=1 (names "
             "are keys of the curated json's scores)")
    bad = {name: w for name, w in cfg.score.items() if not math.isfinite(w)}
    if bad:
        fail(f"score weights must be finite numbers, got {bad}")
    return cfg


def tar_members(url: str, wanted_ext: str | None = None):
    """(key, ext, bytes) of a shard's file members (only ``wanted_ext`` ones if given), read
    as a stream. An unreadable or cut-short shard stops the command naming it."""
    local = "://" not in url and not url.startswith("pipe:")
    try:
        with (open(url, "rb") if local else open_source(url)) as stream, \
                streamed_tar(stream) as tar:
            for member in tar:
                key, _, ext = Path(member.name).name.partition(".")
                ext = ext.lower()
                if member.isfile() and ext and wanted_ext in (None, ext):
                    yield key, ext, tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as err:
        fail(f"input shard {url} cannot be read: {err}")


def read_scores(url: str) -> list[tuple[str, dict | None]]:
    """(key, json metadata, None if unreadable) of every sample of a shard with a json."""
    found = []
    for key, _, data in tar_members(url, "json"):
        try:
            meta = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        found.append((key, meta if isinstance(meta, dict) else None))
    return found


def score_value(meta: dict, name: str) -> float | None:
    """A clip's ``name`` score: from the curated ``scores``, else a top-level field."""
    scores = meta.get("scores")
    value = (scores if isinstance(scores, dict) else {}).get(name, meta.get(name))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rank_fractions(values: np.ndarray) -> np.ndarray:
    """Each value's rank among ``values`` scaled to [0, 1] (smallest 0, largest 1; ties get
    their mean rank; a single value gets 1)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 1:
        return np.ones(1)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # first and last sorted position of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)] - 1
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends) / 2, ends - starts + 1)
    return ranks / (len(values) - 1)


@dataclass
class Candidates:
    """Every clip with all weighted scores, in input order: its shard index and key, and
    one column of values per score (about 100 bytes a clip in memory)."""

    shards: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)


def rank_candidates(urls: list[str], weights: dict[str, float]
                    ) -> tuple[Candidates, np.ndarray, np.ndarray, Counter]:
    """(candidates, their combined scores, the candidate indices best first, skip counts
    by reason); ties keep the input order, so the pick depends on the inputs alone."""
    found, skipped, names = Candidates(values={n: [] for n in weights}), Counter(), set()
    for shard, url in enumerate(urls):
        for key, meta in read_scores(url):
            if meta is None:
                skipped["bad_json"] += 1
                continue
            if isinstance(meta.get("scores"), dict):
                names |= set(meta["scores"])
            values = {name: score_value(meta, name) for name in weights}
            missing = [name for name, value in values.items() if value is None]
            if missing:
                skipped[f"missing_{missing[0]}"] += 1
                continue
            found.shards.append(shard)
            found.keys.append(key)
            for name, value in values.items():
                found.values[name].append(value)
    if not found.keys:
        fail(f"no clip of input carries every weighted score {sorted(weights)} (skipped: "
             f"{dict(skipped)}; scores the clips carry: {sorted(names)})")
    combined = sum(weight * rank_fractions(found.values[name])
                   for name, weight in weights.items())
    order = np.lexsort((np.arange(len(found.keys)), -combined))
    return found, combined, order, skipped


def write_split(picks: list[dict], urls: list[str], folder: Path, shard_size: int) -> list[str]:
    """The picks' samples, in rank order, into ``folder/000000.tar``, ...; the shard paths."""
    wanted: dict[int, set[str]] = {}
    for pick in picks:
        wanted.setdefault(pick["shard"], set()).add(pick["key"])
    members: dict[tuple[int, str], dict[str, bytes]] = {}
    for shard, keys in wanted.items():
        for key, ext, data in tar_members(urls[shard]):
            if key in keys:
                members.setdefault((shard, key), {})[ext] = data
    paths = []
    for start in range(0, len(picks), shard_size):
        path = folder / f"{start // shard_size:06d}.tar"
        write_shard(path, (_picked_sample(pick, members[pick["shard"], pick["key"]])
                           for pick in picks[start:start + shard_size]))
        paths.append(str(path))
    return paths


def _picked_sample(pick: dict, data: dict[str, bytes]) -> dict:
    meta = json.loads(data["json"])
    if "weight" in meta:  # the curation's sampling weight: the fine-tuning set uses each once
        meta["curation_weight"] = meta.pop("weight")
    meta["select"] = {"score": pick["score"], "rank": pick["rank"]}
    return {"__key__": pick["key"], **{e: d for e, d in data.items() if e != "json"},
            "json": meta}


def pattern(paths: list[str]) -> str:
    folder = Path(paths[0]).parent
    return str(folder / f"{{000000..{len(paths) - 1:06d}}}.tar")


def main(argv: list[str]) -> dict:
    cfg = parse_options(argv)
    try:
        urls = expand_shards(cfg.input, "input")
    except ValueError as err:
        fail(str(err))
    output = Path(cfg.output)
    options = {"input": cfg.input, "top": cfg.top, "val": cfg.val, "score": dict(cfg.score),
               "shard_size": cfg.shard_size, "seed": cfg.seed}
    if (output / REPORT).is_file() and read_json(output / REPORT)["options"] != options:
        fail(f"output={cfg.output} holds a selection made with other options (see "
             f"{output / REPORT}); delete it or pick another output=")
    found, combined, order, skipped = rank_candidates(urls, cfg.score)
    picks = [{"shard": found.shards[i], "key": found.keys[i], "rank": rank,
              "score": round(float(combined[i]), 9),
              "scores": {name: column[i] for name, column in found.values.items()}}
             for rank, i in enumerate(order[:cfg.top].tolist())]
    held_out = set(random.Random(cfg.seed).sample(range(len(picks)), min(cfg.val, len(picks))))
    splits = {"train": [p for i, p in enumerate(picks) if i not in held_out],
              "val": [p for i, p in enumerate(picks) if i in held_out]}
    shards = {name: write_split(split, urls, output / name, cfg.shard_size)
              for name, split in splits.items() if split}
    report = {"options": options, "candidates": len(found.keys), "skipped": dict(skipped),
              "picked": {name: len(split) for name, split in splits.items()},
              "shards": {name: pattern(paths) for name, paths in shards.items()},
              "picks": [{"key": p["key"], "shard": urls[p["shard"]], "rank": p["rank"],
                         "score": p["score"], "scores": p["scores"],
                         "split": "val" if i in held_out else "train"}
                        for i, p in enumerate(picks)]}
    write_json(output / REPORT, report)
    print(summary(report))
    return report


def summary(report: dict) -> str:
    picked, skipped = report["picked"], report["skipped"]
    lines = [f"picked {picked['train'] + picked['val']} of {report['candidates']} scored clips "
             f"({picked['train']} train, {picked['val']} val)"
             + (f"; skipped {sum(skipped.values())}: {skipped}" if skipped else "")]
    if len(report["picks"]) < report["options"]["top"]:
        lines.append(f"warning: top={report['options']['top']} asked for more clips than "
                     f"the {report['candidates']} scored")
    overrides = [f"data.shards='{report['shards']['train']}'"] if "train" in report["shards"] \
        else []
    if "val" in report["shards"]:
        overrides.append(f"data.val_shards='{report['shards']['val']}'")
    else:
        lines.append("no held-out shards (val=0): early stopping needs data.val_shards")
    if overrides:
        lines.append("train on them with: data=webdataset " + " ".join(overrides))
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
