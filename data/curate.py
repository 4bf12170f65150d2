"""Curate raw video shards: ``python -m data.curate input='raw/{000000..000099}.tar'
output=curated/ [workers=N] [wandb=offline|online|disabled] [config=conf.yaml]
[filters.NAME.THRESHOLD=value ...] [balance.num_clusters=K] [aspect_mix.landscape=F]
[max_member_bytes=N] [libav_log=off|error|warning|...]``,
or a folder of videos: ``input=videos/ captions=captions.jsonl [shard_size=100]`` (lines
``{"file": path under the folder, "caption": ...}``; curated shards are then numbered
000000.tar, ...).

Runs the filter chain of `conf/curate/default.yaml` (or `config=`) over every sample,
one worker process per shard, then near-duplicates across the whole dataset, concept
balancing and the landscape/portrait mix (sampling weights), and writes curated shards
of the same names under `output/`, `report.json` (samples and hours each filter removed,
with reasons; the aspect mix achieved) and a funnel table on stdout, also logged to
wandb. See `data/curation/job.py` for the passes and how restarts work. A shard that
cannot be read to its end is not published: the job finishes the others, then exits
with status 1 naming it; a rerun tries it again. A worker process that dies (killed
for memory) fails the job after the other shards, naming its shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from braceexpand import braceexpand
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf
from data.curation import FILTERS, SCORERS, AspectBalancer
from data.curation.job import (
    dedup_and_balance,
    filter_shard,
    read_json,
    write_curated_shard,
    write_json,
)
from data.curation.raw import source_identity
from data.curation.report import funnel, funnel_rows, funnel_table
from data.curation.workers import JobsFailed, run_jobs
from data.video import LIBAV_LOG_LEVELS, route_libav_logs

DEFAULT_CONFIG = Path(conf.__file__).resolve().parent / "curate" / "default.yaml"
USAGE = "python -m data.curate input='raw/{000000..000099}.tar' output=curated/ [key=value ...]"
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class CurateConfig:
    input: str = ""  # brace pattern of raw tar shards, or a folder of videos
    captions: str = ""  # with a folder input: JSONL lines {"file": ..., "caption": ...}
    shard_size: int = 100  # with a folder input: videos per curated shard
    output: str = ""  # folder for the curated shards, report.json and .work/
    config: str = str(DEFAULT_CONFIG)  # filter order and thresholds
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    wandb: str = "offline"
    project: str = "cinetron-curation"
    # Threshold overrides laid over the YAML: filters.<filter name>.<field>=value
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    balance: dict[str, Any] = field(default_factory=dict)  # balance.<field>=value
    aspect_mix: dict[str, Any] = field(default_factory=dict)  # aspect_mix.<field>=value
    max_member_bytes: int | None = None  # overrides the config's: larger members are dropped
    libav_log: str = "off"  # libav's own messages from this level up go to Python logging


def parse_options(argv: list[str]) -> CurateConfig:
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CurateConfig),
                                                  OmegaConf.from_cli(argv)))
    except OmegaConfBaseException as err:
        raise SystemExit(f"data.curate: {str(err).splitlines()[0]} (usage: {USAGE})") from None
    if not cfg.input:
        raise SystemExit(f"data.curate: input= is required (usage: {USAGE})")
    if not cfg.output:
        raise SystemExit(f"data.curate: output= is required (usage: {USAGE})")
    if cfg.workers < 1:
        raise SystemExit(f"data.curate: workers={cfg.workers} must be >= 1")
    if cfg.wandb not in WANDB_MODES:
        raise SystemExit(f"data.curate: wandb={cfg.wandb!r} must be one of {WANDB_MODES}")
    if cfg.libav_log not in LIBAV_LOG_LEVELS:
        raise SystemExit(f"data.curate: libav_log={cfg.libav_log!r} must be one of "
                         f"{tuple(LIBAV_LOG_LEVELS)}")
    return cfg


def input_sources(cfg: CurateConfig) -> list[tuple[str, str | dict]]:
    """(curated shard name, raw source) pairs: brace-expanded tar paths, which must all
    exist and differ in file name, or chunks of a folder's captions JSONL."""
    if cfg.captions:
        return folder_sources(cfg.input, cfg.captions, cfg.shard_size)
    paths = [os.path.abspath(p) for p in braceexpand(cfg.input)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        hint = " (a folder of videos needs captions=FILE.jsonl)" if os.path.isdir(cfg.input) else ""
        raise SystemExit(f"data.curate: input={cfg.input!r}: {len(missing)} of {len(paths)} "
                         f"shards do not exist, e.g. {missing[0]!r}{hint}")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):
        raise SystemExit(f"data.curate: input={cfg.input!r} has shards of the same file name "
                         f"in different folders; curated shards are named after them")
    return list(zip(names, paths, strict=True))


def folder_sources(folder: str, captions: str, shard_size: int) -> list[tuple[str, dict]]:
    if not os.path.isdir(folder):
        raise SystemExit(f"data.curate: input={folder!r} is not a folder (with captions=)")
    if shard_size < 1:
        raise SystemExit(f"data.curate: shard_size={shard_size} must be >= 1")
    items = []
    try:
        lines = Path(captions).read_text().splitlines()
    except OSError as err:
        raise SystemExit(f"data.curate: captions={captions!r} cannot be read: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            items.append([str(entry["file"]), str(entry.get("caption") or "")])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"data.curate: captions={captions!r} line {number} is not "
                             f'{{"file": ..., "caption": ...}}: {err!r}') from None
    if not items:
        raise SystemExit(f"data.curate: captions={captions!r} lists no videos")
    folder = os.path.abspath(folder)
    return [(f"{i // shard_size:06d}.tar", {"folder": folder, "items": items[i:i + shard_size]})
            for i in range(0, len(items), shard_size)]


def load_chain_config(cfg: CurateConfig) -> dict:
    """{analysis, max_member_bytes, filters, balance, aspect_mix} of the YAML with the
    command line's overrides; a missing or null balance or aspect_mix switches that step
    off."""
    try:
        loaded = yaml.safe_load(Path(cfg.config).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"data.curate: config={cfg.config!r} cannot be read: {err}") from None
    names = [spec["name"] for spec in loaded["filters"]]
    for name, overrides in cfg.filters.items():
        if name not in names:
            known = "" if name in FILTERS | SCORERS else f" (known filters: {sorted(names)})"
            raise SystemExit(f"data.curate: filters.{name}: no filter {name!r} in "
                             f"config={cfg.config}{known}")
        loaded["filters"][names.index(name)].update(overrides)
    balance = loaded.get("balance")
    if balance is not None:
        balance = {**balance, **cfg.balance}
    aspect_mix = loaded.get("aspect_mix")
    if aspect_mix is not None:
        aspect_mix = {**aspect_mix, **cfg.aspect_mix}
        try:
            AspectBalancer(**aspect_mix)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"data.curate: {err} (config={cfg.config})") from None
    limit = loaded.get("max_member_bytes") if cfg.max_member_bytes is None \
        else cfg.max_member_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise SystemExit(f"data.curate: max_member_bytes={limit!r} (config={cfg.config} or the "
                         f"command line) must be a whole number of bytes >= 1, e.g. 1073741824")
    return {"analysis": loaded["analysis"], "max_member_bytes": limit,
            "filters": loaded["filters"], "balance": balance, "aspect_mix": aspect_mix}


def check_work_dir(work: Path, chain: dict) -> None:
    """Intermediate results are reused on restart only if made by the same chain config."""
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "config.json"
    if stamp.exists() and read_json(stamp) != chain:
        raise SystemExit(f"data.curate: {work} holds results of a different filter config "
                         f"(see {stamp}); delete it, or pick another output=")
    if not stamp.exists():
        write_json(stamp, chain)


def work_name(name: str, source: str | dict) -> str:
    """One intermediate file per shard, named after its source's identity (a tar's path,
    size and modification time; a folder chunk's files, captions, sizes and times), so
    a replaced input is judged again rather than read from an old result."""
    identity = json.dumps(source_identity(source), sort_keys=True)
    return f"{name}.{hashlib.sha1(identity.encode()).hexdigest()[:8]}.json"


def worker_setup(libav_log: str) -> None:
    """libav's messages from `libav_log` up, in a worker process (and the job's own), go
    through the `libav` logger to stderr; other libraries' logging stays as it was (a
    root handler would let through PySceneDetect's line per clip)."""
    route_libav_logs(libav_log)
    libav = logging.getLogger("libav")
    if libav_log != "off" and not libav.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        libav.addHandler(handler)


def run_pass(function, jobs: list[tuple], names: list[str], cfg: CurateConfig, what: str) -> list:
    try:
        return run_jobs(function, jobs, names, cfg.workers, partial(worker_setup, cfg.libav_log))
    except JobsFailed as failed:
        listed = "\n".join(f"  {name}: {why}" for name, why in failed.failures.items())
        raise SystemExit(f"data.curate: {what} failed on {len(failed.failures)} shards (the "
                         f"others' results are kept; a rerun resumes):\n{listed}") from None


def log_to_wandb(cfg: CurateConfig, report: dict) -> None:
    if cfg.wandb == "disabled":
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.project, dir=cfg.output, mode=cfg.wandb, job_type="curation",
                     config={"input": cfg.input, "config": cfg.config})
    # a split row removes no hours; wandb wants one type per column
    rows = [[stage, removed, hours or 0.0, left, reasons]
            for stage, removed, hours, left, reasons in funnel_rows(report)]
    table = wandb.Table(columns=["stage", "removed", "hours_removed", "left", "reasons"],
                        data=rows)
    run.log({"funnel": table, "samples_in": report["samples_in"],
             "samples_out": report["samples_out"], "hours_in": report["hours_in"],
             "hours_out": report["hours_out"],
             **{f"removed/{name}": row["samples"] for name, row in report["filters"].items()}})
    run.finish()


def main(argv: list[str]) -> dict:
    cfg = parse_options(argv)
    worker_setup(cfg.libav_log)
    sources = input_sources(cfg)
    chain = load_chain_config(cfg)
    output = Path(cfg.output)
    work = output / ".work"
    check_work_dir(work, chain)
    names = [name for name, _ in sources]
    limit = chain["max_member_bytes"]

    # Pass 1: per-clip filters, a shard per worker process; one done before is not redone.
    jobs = [(name, source, str(work / work_name(name, source)), chain["filters"],
             chain["analysis"], limit) for name, source in sources]
    works = run_pass(filter_shard, jobs, names, cfg, "pass 1 (the filters)")
    # Pass 2: dataset-wide near-duplicates and balancing, in input order (deterministic).
    mix = dedup_and_balance(works, chain["filters"], chain["balance"], chain["aspect_mix"])
    report = {**funnel(works, chain["filters"]), "aspect_mix": mix}
    # Pass 3: curated shards; one written before from the same results is not rewritten.
    done = [(name, source, w) for (name, source), w in zip(sources, works, strict=True)
            if not w["error"]]
    jobs = [(source, str(output / name), str(work / f"{name}.published"), w, limit)
            for name, source, w in done]
    errors = run_pass(write_curated_shard, jobs, [n for n, _, _ in done], cfg,
                      "pass 3 (writing curated shards)")
    report["shard_errors"].update({n: e for (n, _, _), e in zip(done, errors, strict=True) if e})
    report["shards"] = [str(output / n) for n, _, _ in done if n not in report["shard_errors"]]
    write_json(output / "report.json", report)
    print(funnel_table(report))
    log_to_wandb(cfg, report)
    if report["shard_errors"]:
        raise SystemExit(f"data.curate: {len(report['shard_errors'])} shards were not "
                         f"published: {', '.join(report['shard_errors'])} (why: shard_errors in "
                         f"{output / 'report.json'}); repair or replace them and rerun")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
