"""The curation job's passes over tar shards (the CLI is `data/curate.py`).

Pass 1 (`filter_shard`, one worker per shard): run the per-clip filter chain on every
sample of a raw shard and save one intermediate json per shard under `output/.work/`.
Pass 2 (`dedup_and_balance`, in the parent): near-duplicates across the whole dataset
with one `DuplicateIndex`, then concept balancing of the survivors' captions, then the
landscape/portrait mix (its factor multiplies the concept weight).
Pass 3 (`write_curated_shard`, one worker per shard): copy the kept samples into a
curated shard of the same name, their json extended with scores, window and weight.

A splitting filter (scene cuts) makes one record per single shot of a source, keyed
`KEY_s0`, `KEY_s1`, ... in the source's order; each goes through the later filters,
deduplication and balancing on its own, and pass 3 writes each kept shot as a sample
(the source's media with the shot's start/end in its json).

Passes 1 and 3 write each file atomically and skip files made before from the same
input, so a killed job restarts where it stopped; pass 2 is cheap and redone. A pass-1
file is named after its source's identity (path, size, modification time), so a
replaced shard is judged again; a curated shard is rewritten when its pass-2 results
change. A shard that cannot be read to its end is a shard error: nothing of it is
saved or published, and a restart tries it again. Nothing is random (k-means is
seeded), so a rerun gives the same output.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.shards import IMAGE_EXTS, VIDEO_EXTS, write_shard
from data.tars import TarReadError

from . import (
    AspectBalancer,
    Clip,
    ConceptBalancer,
    Decision,
    DuplicateIndex,
    build_filters,
    clip_signature,
    run_filters,
)
from .raw import RawSample, caption_problem, raw_samples, source_identity
from .report import DEDUP, INPUT

# What pass 3 adds to a kept sample's json.
ADDED = ("scores", "start", "end", "weight", "cluster", "orientation", "aspect_factor")


class SampleProblem(ValueError):
    """A sample's json or caption cannot be used; the message is its drop reason."""


def metadata(members: Mapping[str, bytes]) -> tuple[dict, str]:
    """(json metadata, caption: the txt member, else the json's "caption", else "").

    Raises SampleProblem (`bad_json`, `bad_caption`): a json member that is no JSON
    object, nested too deep to parse, or a caption that is no UTF-8 text.
    """
    meta: Any = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
            raise SampleProblem(f"bad_json: {type(err).__name__}: {err}"[:200]) from err
        if not isinstance(meta, dict):
            raise SampleProblem(f"bad_json: a {type(meta).__name__} where an object belongs")
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else ""
    caption = caption or meta.get("caption", "")
    problem = caption_problem(caption)
    if problem:
        raise SampleProblem(problem)
    return meta, caption


@dataclass
class _Signature:
    """Last stage of pass 1: the near-duplicate signature of the kept window (no verdict:
    whether it duplicates another clip is decided dataset-wide in pass 2)."""

    num_frames: int = 3
    hash_size: int = 8
    max_distance: int = 12  # used by pass 2; accepted here so the YAML entry fits as is
    name = DEDUP

    def __call__(self, clip: Clip) -> Decision:
        signature = clip_signature(clip, self.num_frames, self.hash_size)
        return Decision(True, "ok", {"phash": f"{signature:x}"})


def pass1_chain(specs: Sequence[Mapping]) -> list:
    """The per-clip filters of `specs`, in order, with the dedup entry moved last and turned
    into a signature stage (its verdict needs every shard, so it waits for pass 2)."""
    dedup = [dict(s) for s in specs if s["name"] == DEDUP]
    chain = build_filters([s for s in specs if s["name"] != DEDUP])
    if dedup:
        params = {k: v for k, v in dedup[0].items() if k != "name"}
        chain.append(_Signature(**params))
    return chain


def filter_shard(name: str, raw: str | Mapping, work_json: str, specs: Sequence[Mapping],
                 analysis: Mapping, max_member_bytes: int) -> dict:
    """Pass 1 on one raw shard (or folder chunk) called `name`: its work record
    {shard, identity, error, sources, seconds, samples}, saved to `work_json` (and read
    from it when it exists) unless the shard could not be read to its end (`error`).

    Each sample record: key, source (the raw key), keep, dropped_by, reason, seconds
    (of the source, or of the shot; 0 when unknown); with a split, shot (its index) and
    split_by; for kept samples the caption, scores and window start/end.
    """
    if os.path.exists(work_json):
        return read_json(work_json)
    chain = pass1_chain(specs)
    work = {"shard": name, "identity": source_identity(raw), "error": None, "sources": 0,
            "seconds": 0.0, "samples": []}
    try:
        with tempfile.TemporaryDirectory(prefix="curate-") as tmp:
            for sample in raw_samples(raw, max_member_bytes):
                records, seconds = _filter_sample(sample, chain, analysis, tmp)
                work["samples"] += records
                work["sources"] += 1
                work["seconds"] += seconds
    except TarReadError as err:  # not saved: a restart reads the shard again
        return {**work, "error": str(err), "sources": 0, "seconds": 0.0, "samples": []}
    write_json(work_json, work)
    return work


def _filter_sample(sample: RawSample, chain: list, analysis: Mapping,
                   tmp: str) -> tuple[list[dict], float]:
    """(records of the sample or its shots, seconds of the source)."""
    key, members = sample.key, sample.members
    try:
        if sample.problem:
            raise SampleProblem(sample.problem)
        _, caption = metadata(members)
    except SampleProblem as problem:
        return [_drop(key, INPUT, str(problem))], 0.0
    ext = next((e for e in VIDEO_EXTS if e in members), None)
    if ext is None:
        kind = "image" if any(e in members for e in IMAGE_EXTS) else "no media file"
        # The filters judge videos; images need their own chain (not built yet).
        return [_drop(key, "media", f"{kind}: no {'/'.join(VIDEO_EXTS)} member "
                                    f"(has {', '.join(sorted(members))})")], 0.0
    # Clip and PySceneDetect open files by path, so the member goes to a temp file.
    path = os.path.join(tmp, f"sample.{ext}")
    with open(path, "wb") as f:
        f.write(members[ext])
    clip = Clip(path, caption, analysis_fps=analysis["fps"], max_side=analysis["max_side"],
                key=key)
    results = run_filters(clip, chain)
    source_seconds = _finite(results[0].scores.get("duration", 0.0))  # the probe's
    records = []
    for result in results:
        record = _drop(key, result.dropped_by, result.reason) if not result.keep else \
            {"key": key, "source": key, "keep": True, "dropped_by": None, "reason": "ok"}
        seconds = source_seconds
        if result.shot is not None:
            start, end = result.scores["shot"]
            record.update(key=f"{key}_s{result.shot}", shot=result.shot,
                          split_by=result.split_by)
            seconds = end - start
        # Decoder messages name the temp file: drop it so reasons repeat across runs and group.
        record.update(reason=record["reason"].replace(path, f"<{ext} member>"),
                      seconds=round(seconds, 3))
        if result.keep:
            record.update(caption=caption, scores=result.scores,
                          start=round(result.start_s, 3), end=round(result.end_s, 3))
        records.append(record)
    return records, source_seconds


def _drop(key: str, stage: str, reason: str) -> dict:
    return {"key": key, "source": key, "keep": False, "dropped_by": stage, "reason": reason,
            "seconds": 0.0}


def _finite(seconds: float) -> float:
    return seconds if seconds == seconds and abs(seconds) != float("inf") else 0.0


def dedup_and_balance(works: Sequence[dict], specs: Sequence[Mapping],
                      balance: Mapping | None, aspect_mix: Mapping | None = None) -> dict | None:
    """Pass 2 over the pass-1 results in the given (fixed) order, in place: near-duplicates
    become drops, and each survivor gets its sampling `weight` and caption `cluster`, and
    with `aspect_mix` its `orientation` and `aspect_factor` (already in `weight`).

    The first of a near-duplicate group is kept, the later ones name it in their reason.
    Returns the AspectBalancer's report of the mix (None without `aspect_mix`).
    """
    dedup = next((s for s in specs if s["name"] == DEDUP), None)
    if dedup is not None:
        stage = _Signature(**{k: v for k, v in dedup.items() if k != "name"})
        index = DuplicateIndex(stage.num_frames * stage.hash_size**2, stage.max_distance)
        for record in kept_records(works):
            signature = int(record["scores"]["phash"], 16)
            match = index.query(signature)
            if match is None:
                index.add(record["key"], signature)
                continue
            other, dist = match
            record.update(keep=False, dropped_by=DEDUP, reason=f"near-duplicate of {other}")
            record["scores"].update(duplicate_of=other, duplicate_distance=dist)
    survivors = list(kept_records(works))
    if not survivors:
        return None
    if balance is None:  # balancing switched off: every sample drawn once per epoch
        labels, weights = [0] * len(survivors), [1.0] * len(survivors)
    else:  # ConceptBalancer caps num_clusters at the number of captions
        labels, weights = ConceptBalancer(**balance)([r["caption"] for r in survivors])
    for record, label, weight in zip(survivors, labels, weights, strict=True):
        record.update(weight=round(float(weight), 6), cluster=int(label))
    if aspect_mix is None:
        return None
    factors, kinds, report = AspectBalancer(**aspect_mix)(
        [_aspect(r) for r in survivors], [r["weight"] for r in survivors])
    for record, factor, kind in zip(survivors, factors, kinds, strict=True):
        record.update(weight=round(record["weight"] * float(factor), 6),
                      aspect_factor=round(float(factor), 6), orientation=kind)
    return report


def _aspect(record: Mapping) -> float:
    """Displayed width/height: the aspect filter's score, else the probe's frame size."""
    scores = record["scores"]
    if "aspect" in scores:
        return scores["aspect"]
    if scores.get("height"):
        return scores["width"] / scores["height"]
    raise ValueError(f"aspect_mix needs the aspect or probe filter in the chain: clip "
                     f"{record['key']} has no aspect score")


def kept_records(works: Sequence[dict]) -> Iterator[dict]:
    return (r for work in works for r in work["samples"] if r["keep"])


def write_curated_shard(raw: str | Mapping, out: str, stamp: str, work: Mapping,
                        max_member_bytes: int) -> str | None:
    """Pass 3: the kept samples of `work` (pass-2 results of `raw`) into `out`; their json
    is the original json plus scores, start/end, weight and cluster. None when written,
    or found written before from the same results (`stamp` holds their digest); else
    why it was not written (a shard error: then `out` is left as it was)."""
    kept: dict[str, list[dict]] = {}
    for record in work["samples"]:
        if record["keep"]:
            kept.setdefault(record["source"], []).append(record)
    added = {r["key"]: {k: r[k] for k in ADDED if k in r} for rs in kept.values() for r in rs}
    digest = hashlib.sha1(json.dumps([work["identity"], added], sort_keys=True).encode())
    digest = digest.hexdigest()
    if os.path.exists(out) and os.path.exists(stamp) and read_json(stamp) == digest:
        return None
    if source_identity(raw) != work["identity"]:
        return f"{work['shard']} changed since pass 1 judged it: rerun to judge it again"

    def curated():
        for sample in raw_samples(raw, max_member_bytes, wanted=set(kept)):
            if sample.problem:  # pass 1 kept it: its bytes changed under the same identity
                raise TarReadError(f"{work['shard']}: sample {sample.key} changed since "
                                   f"pass 1: {sample.problem}")
            meta, _ = metadata(sample.members)
            media = {e: d for e, d in sample.members.items() if e != "json"}
            for record in kept[sample.key]:
                yield {"__key__": record["key"], **media, "json": {**meta, **added[record["key"]]}}

    try:
        write_shard(out, curated())  # renamed into place only once complete
    except TarReadError as err:
        return str(err)
    write_json(stamp, digest)
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """json written to a temp file and renamed: a reader sees all of it or nothing."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())

