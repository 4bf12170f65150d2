"""The curation job's passes over tar shards (the CLI is `data/curate.py`).

Pass 1 (`filter_shard`, one worker per shard): run the per-clip filter chain on every
sample of a raw shard and save one intermediate json per shard under `output/.work/`.
Pass 2 (`dedup_and_balance`, in the parent): near-duplicates across the whole dataset
with one `DuplicateIndex`, then concept balancing of the survivors' captions, then the
landscape/portrait mix (its factor multiplies the concept weight).
Pass 3 (`write_curated_shard`, one worker per shard): copy the kept samples into a
curated shard of the same name, their json extended with scores, window and weight.

Passes 1 and 3 write each file atomically and skip files that exist, so a killed job
restarts where it stopped; pass 2 is cheap and redone. Nothing is random (k-means is
seeded), so a rerun gives the same output.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.shards import IMAGE_EXTS, VIDEO_EXTS, write_shard

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

DEDUP = "duplicates"  # the filter name that runs dataset-wide, in pass 2


def read_raw_shard(source: str | Mapping) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    """([(key, {ext: bytes})] in order, error) of a tar path or a folder chunk (see
    `read_folder_chunk`); a broken tar keeps the samples read before the break."""
    if not isinstance(source, str):
        return read_folder_chunk(source), None
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(source) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                key, _, ext = name.partition(".")
                if not ext:
                    continue
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext.lower()] = data
    except (OSError, tarfile.TarError) as err:
        return list(samples.items()), f"unreadable tar after {len(samples)} samples: {err}"
    return list(samples.items()), None


def read_folder_chunk(chunk: Mapping) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of `{"folder": dir, "items": [[file, caption], ...]}` (a captions JSONL).

    The key is the file's path under the folder with `/` and `.` turned into `_` (a
    shard key must not hold a dot); the json records the file. A missing file leaves a
    sample without media, which pass 1 counts as a drop.
    """
    samples = []
    for file, caption in chunk["items"]:
        key = re.sub(r"[/.]", "_", file)
        members: dict[str, Any] = {"txt": caption.encode(), "json": json.dumps(
            {"source_file": file}).encode()}
        path = os.path.join(chunk["folder"], file)
        if os.path.isfile(path):
            members[Path(file).suffix.lstrip(".").lower() or "bin"] = Path(path).read_bytes()
        samples.append((key, members))
    return samples


def _metadata(members: Mapping[str, bytes]) -> tuple[dict, str]:
    """(json metadata, caption); a broken json counts as none (the caption filter judges)."""
    meta: Any = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    meta = meta if isinstance(meta, dict) else {}
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else ""
    caption = caption or meta.get("caption") or ""
    return meta, caption if isinstance(caption, str) else ""


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
                 analysis: Mapping) -> str:
    """Pass 1 on one raw shard (or folder chunk) called `name`; writes `work_json`
    (skipped when it exists) and returns its path.

    Each sample record: key, keep, dropped_by, reason, seconds (source duration, 0 when
    unknown), and for kept samples the caption, scores and window start/end.
    """
    if os.path.exists(work_json):
        return work_json
    chain = pass1_chain(specs)
    samples, error = read_raw_shard(raw)
    records = []
    with tempfile.TemporaryDirectory(prefix="curate-") as tmp:
        for key, members in samples:
            records.append(_filter_sample(key, members, chain, analysis, tmp))
    write_json(work_json, {"shard": name, "error": error, "samples": records})
    return work_json


def _filter_sample(key: str, members: Mapping[str, bytes], chain: list,
                   analysis: Mapping, tmp: str) -> dict:
    _, caption = _metadata(members)
    ext = next((e for e in VIDEO_EXTS if e in members), None)
    if ext is None:
        kind = "image" if any(e in members for e in IMAGE_EXTS) else "no media file"
        # The filters judge videos; images need their own chain (not built yet).
        return {"key": key, "keep": False, "dropped_by": "media", "seconds": 0.0,
                "reason": f"{kind}: no {'/'.join(VIDEO_EXTS)} member "
                          f"(has {', '.join(sorted(members))})"}
    # Clip and PySceneDetect open files by path, so the member goes to a temp file.
    path = os.path.join(tmp, f"sample.{ext}")
    with open(path, "wb") as f:
        f.write(members[ext])
    clip = Clip(path, caption, analysis_fps=analysis["fps"], max_side=analysis["max_side"],
                key=key)
    result = run_filters(clip, chain)
    seconds = result.scores.get("duration", 0.0)
    # Decoder messages name the temp file: drop it so reasons repeat across runs and group.
    reason = result.reason.replace(path, f"<{ext} member>")
    record = {"key": key, "keep": result.keep, "dropped_by": result.dropped_by,
              "reason": reason, "seconds": seconds if seconds == seconds else 0.0}
    if result.keep:
        record.update(caption=caption, scores=result.scores,
                      start=round(result.start_s, 3), end=round(result.end_s, 3))
    return record


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


def write_curated_shard(raw: str | Mapping, out: str, records: Sequence[dict]) -> str:
    """Pass 3: the kept samples among `records` (pass-2 results of `raw`) into `out`;
    their json is the original json plus scores, clip start/end, weight and cluster.
    Skipped when `out` exists (write_shard renames a complete tar into place)."""
    if os.path.exists(out):
        return out
    fields = ("scores", "start", "end", "weight", "cluster", "orientation", "aspect_factor")
    added = {r["key"]: {k: r[k] for k in fields if k in r} for r in records if r["keep"]}
    samples, _ = read_raw_shard(raw)

    def curated():
        for key, members in samples:
            if key in added:
                meta, _ = _metadata(members)
                yield {"__key__": key, **{e: d for e, d in members.items() if e != "json"},
                       "json": {**meta, **added[key]}}

    write_shard(out, curated())
    return out


def funnel(works: Sequence[dict], specs: Sequence[Mapping]) -> dict:
    """The report: totals in/out and, per stage in chain order, samples and hours removed
    with reason counts (numbers and keys folded out of the reasons so they group)."""
    stages = ["media", *[s["name"] for s in specs if s["name"] != DEDUP]]
    stages += [DEDUP] if any(s["name"] == DEDUP for s in specs) else []
    removed = {name: {"samples": 0, "hours": 0.0, "reasons": Counter()} for name in stages}
    records = [r for work in works for r in work["samples"]]
    for r in records:
        if not r["keep"]:
            row = removed[r["dropped_by"]]
            row["samples"] += 1
            row["hours"] += r["seconds"] / 3600
            row["reasons"][_reason_kind(r["reason"])] += 1
    kept = [r for r in records if r["keep"]]
    for row in removed.values():
        row["hours"] = round(row["hours"], 6)
        row["reasons"] = dict(row["reasons"].most_common())
    return {
        "samples_in": len(records), "samples_out": len(kept),
        "hours_in": round(sum(r["seconds"] for r in records) / 3600, 6),
        "hours_out": round(sum(r["end"] - r["start"] for r in kept) / 3600, 6),
        "shard_errors": {w["shard"]: w["error"] for w in works if w["error"]},
        "filters": removed,
    }


def _reason_kind(reason: str) -> str:
    if reason.startswith("near-duplicate of "):
        return "near-duplicate"
    return re.sub(r"(?<![A-Za-z])\d+(\.\d+)?", "N", reason)[:120]


def funnel_table(report: Mapping) -> str:
    """The funnel as a markdown table: samples left after each stage; then the aspect mix."""
    left = report["samples_in"]
    lines = [f"Curation funnel: {report['samples_in']} samples "
             f"({report['hours_in']:.4f} h) in, {report['samples_out']} "
             f"({report['hours_out']:.4f} h) out", "",
             "| stage | removed | hours removed | left | reasons |", "|---|---|---|---|---|"]
    for name, row in report["filters"].items():
        left -= row["samples"]
        reasons = "; ".join(f"{k} ({n})" for k, n in row["reasons"].items())
        reasons = reasons.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| {name} | {row['samples']} | {row['hours']:.4f} | {left} | {reasons} |")
    if report.get("aspect_mix"):
        lines += ["", aspect_line(report["aspect_mix"])]
    return "\n".join(lines)


def aspect_line(mix: Mapping) -> str:
    """One line: the landscape:portrait share of expected samples before/after the mix."""
    def pair(share):
        return "n/a" if share is None else f"{share:.1%}:{1 - share:.1%}"

    clips, factors = mix["clips"], mix["factors"]
    return (f"Aspect mix, landscape:portrait share of samples per epoch: "
            f"{pair(mix['landscape_before'])} -> {pair(mix['landscape_after'])} (target "
            f"{pair(mix['target_landscape'])}; weight factors landscape x"
            f"{factors['landscape']:.3f}, portrait x{factors['portrait']:.3f}, at most "
            f"x{mix['max_factor']:g} apart; clips {clips['landscape']} landscape, "
            f"{clips['portrait']} portrait, {clips['square']} square counted as "
            f"{mix['squares']})")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """json written to a temp file and renamed: a reader sees all of it or nothing."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())

