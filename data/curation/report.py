"""The curation funnel: what each stage removed, and the single-shot split, from the
pass-1/2 records (`data/curation/job.py`), as `report.json` and a printed table."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

INPUT = "input"  # drops before any filter: unreadable json/caption, duplicate key, too large
DEDUP = "duplicates"  # the filter name that runs dataset-wide, in pass 2
# Reasons whose kind is their code alone (the rest names keys, files, sizes).
CODES = ("bad_json", "bad_caption", "duplicate_key", "too_large", "unreadable")


def funnel(works: Sequence[dict], specs: Sequence[Mapping]) -> dict:
    """The report: totals in/out, the split into single shots and, per stage in chain
    order, samples and hours removed with reason counts (numbers and keys folded out so
    they group) and one example (shard, key and full reason) per reason."""
    stages = [INPUT, "media", *[s["name"] for s in specs if s["name"] != DEDUP]]
    stages += [DEDUP] if any(s["name"] == DEDUP for s in specs) else []
    removed = {name: {"samples": 0, "hours": 0.0, "reasons": Counter(), "examples": {}}
               for name in stages}
    split: dict[str, dict] = {}
    for work in works:
        for r in work["samples"]:
            if "split_by" in r:
                row = split.setdefault(r["split_by"], {"sources": set(), "shots": 0})
                row["sources"].add((work["shard"], r["source"]))
                row["shots"] += 1
            if r["keep"]:
                continue
            row = removed[r["dropped_by"]]
            row["samples"] += 1
            row["hours"] += r["seconds"] / 3600
            kind = reason_kind(r["reason"])
            row["reasons"][kind] += 1
            row["examples"].setdefault(kind, f"{work['shard']}/{r['key']}: {r['reason']}"[:300])
    for row in removed.values():
        row["hours"] = round(row["hours"], 6)
        row["reasons"] = dict(row["reasons"].most_common())
    kept = [r for work in works for r in work["samples"] if r["keep"]]
    return {
        "samples_in": sum(w["sources"] for w in works), "samples_out": len(kept),
        "hours_in": round(sum(w["seconds"] for w in works) / 3600, 6),
        "hours_out": round(sum(r["end"] - r["start"] for r in kept) / 3600, 6),
        "split": {stage: {"sources": len(row["sources"]), "shots": row["shots"]}
                  for stage, row in split.items()},
        "shard_errors": {w["shard"]: w["error"] for w in works if w["error"]},
        "filters": removed,
    }


def reason_kind(reason: str) -> str:
    if reason.startswith("near-duplicate of "):
        return "near-duplicate"
    code = reason.split(":", 1)[0]
    if code in CODES:
        return code
    if code == "filter_error":  # "filter_error: <filter>: <exception type>"
        return ":".join(reason.split(":", 3)[:3])
    return re.sub(r"(?<![A-Za-z])\d+(\.\d+)?", "N", reason)[:120]


def funnel_rows(report: Mapping) -> Iterator[tuple[str, str, float | None, int, str]]:
    """(stage, removed, hours removed, samples left, reasons) per row: the stages, and
    after a splitting stage a row for its split (sources -> single shots)."""
    left = report["samples_in"]
    for name, row in report["filters"].items():
        left -= row["samples"]
        reasons = "; ".join(f"{k} ({n})" for k, n in row["reasons"].items())
        yield name, str(row["samples"]), row["hours"], left, reasons
        if name in report.get("split", {}):
            split = report["split"][name]
            # the sources it kept, one row up, become their shots
            left += split["shots"] - split["sources"]
            yield (f"{name}: split into shots", f"{split['sources']} -> {split['shots']}", None,
                   left, f"{split['sources']} sources into {split['shots']} single shots")


def funnel_table(report: Mapping) -> str:
    """The funnel as a markdown table: samples left after each stage; then the aspect mix
    and the shards that could not be read."""
    lines = [f"Curation funnel: {report['samples_in']} samples "
             f"({report['hours_in']:.4f} h) in, {report['samples_out']} "
             f"({report['hours_out']:.4f} h) out", "",
             "| stage | removed | hours removed | left | reasons |", "|---|---|---|---|---|"]
    for name, removed, hours, left, reasons in funnel_rows(report):
        hours = "" if hours is None else f"{hours:.4f}"
        reasons = reasons.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| {name} | {removed} | {hours} | {left} | {reasons} |")
    if report.get("aspect_mix"):
        lines += ["", aspect_line(report["aspect_mix"])]
    if report["shard_errors"]:
        lines += ["", f"{len(report['shard_errors'])} shards were not published (rerun to "
                      f"retry them):"]
        lines += [f"- {name}: {error}" for name, error in report["shard_errors"].items()]
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
