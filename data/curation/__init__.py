"""Movie Gen-style curation filters (arXiv 2410.13720 §4).

Each filter is a small dataclass: its fields are its thresholds (set from
`conf/curate/*.yaml`), and `filter(clip) -> Decision`. `build_filters` turns the YAML
list into filters, in order; `run_filters` applies them to one clip, cheapest first,
stopping at the first that drops it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .balance import AspectBalancer, ConceptBalancer, embed_captions, load_caption_encoder
from .basic import AspectFilter, CaptionFilter, DurationFilter, ProbeFilter, ResolutionFilter
from .clip import Clip, Decision, Probe, ProbeError, probe_video
from .dedup import DuplicateFilter, DuplicateIndex, clip_signature
from .scorers import ClipScorer, ScoreFilter, TextAreaHeuristic
from .visual import BorderFilter, MotionFilter, SceneCutFilter, SharpnessFilter

FILTERS = {
    cls.name: cls
    for cls in (
        ProbeFilter, ResolutionFilter, AspectFilter, DurationFilter, CaptionFilter,
        SceneCutFilter, MotionFilter, BorderFilter, SharpnessFilter, DuplicateFilter,
    )
}
SCORERS = {TextAreaHeuristic.name: TextAreaHeuristic}


def build_filter(spec: Mapping):
    """One filter from `{name: ..., <threshold>: ...}`; scorers take min_score/max_score."""
    params = dict(spec)
    name = params.pop("name")
    if name in SCORERS:
        bounds = {k: params.pop(k) for k in ("min_score", "max_score") if k in params}
        return ScoreFilter(SCORERS[name](**params), **bounds)
    if name not in FILTERS:
        raise ValueError(f"unknown curation filter {name!r}; known: {sorted(FILTERS | SCORERS)}")
    return FILTERS[name](**params)


def build_filters(specs: Iterable[Mapping]) -> list:
    return [build_filter(spec) for spec in specs]


@dataclass
class ChainResult:
    """Outcome of a filter chain on one clip: who dropped it and every score gathered.

    `start_s`/`end_s` are the kept window (after e.g. the duration filter's skip);
    None when the clip was dropped. `shot` is the index of the single-shot window this
    result judges when a filter (`split_by`) split the clip, else None.
    """

    keep: bool
    dropped_by: str | None
    reason: str
    scores: dict = field(default_factory=dict)
    start_s: float | None = None
    end_s: float | None = None
    shot: int | None = None
    split_by: str | None = None


def run_filters(clip: Clip, filters: Sequence) -> list[ChainResult]:
    """Apply `filters` in order; a Decision.window narrows the clip for later filters.

    A Decision.split (single shots) ends the clip's own path: each window goes on
    through the filters that follow as a clip of its own, so a clip gives one result per
    window (one result without a split). A clip that fails to decode inside any filter,
    or a filter that raises, is a drop with the reason, never a crash of the job.
    """
    return _run(clip, filters, {}, None, None)


def _run(clip: Clip, filters: Sequence, scores: dict, shot: int | None,
         split_by: str | None) -> list[ChainResult]:
    scores = dict(scores)
    for position, filt in enumerate(filters):
        try:
            decision = filt(clip)
        except ProbeError as err:
            return [ChainResult(False, filt.name, str(err), scores, shot=shot, split_by=split_by)]
        except Exception as err:  # a filter's bug or a file it cannot handle: one sample's drop
            reason = f"filter_error: {filt.name}: {type(err).__name__}: {err}"
            return [ChainResult(False, filt.name, reason, scores, shot=shot, split_by=split_by)]
        scores.update(decision.scores)
        if not decision.keep:
            return [ChainResult(False, filt.name, decision.reason, scores, shot=shot,
                                split_by=split_by)]
        if decision.split is not None:
            rest = filters[position + 1:]
            return [result for index, (start, end) in enumerate(decision.split)
                    for result in _run(clip.window(start, end), rest,
                                       {**scores, "shot": [start, end]}, index, filt.name)]
        if decision.window is not None:
            clip = clip.window(*decision.window)
    return [ChainResult(True, None, "ok", scores, clip.start_s, clip.end_s, shot, split_by)]


__all__ = [
    "FILTERS", "SCORERS", "AspectBalancer", "AspectFilter", "BorderFilter", "CaptionFilter",
    "ChainResult", "Clip", "ClipScorer", "ConceptBalancer", "Decision", "DuplicateFilter",
    "DuplicateIndex",
    "DurationFilter", "MotionFilter", "Probe", "ProbeError", "ProbeFilter", "ResolutionFilter",
    "SceneCutFilter", "ScoreFilter", "SharpnessFilter", "TextAreaHeuristic", "build_filter",
    "build_filters", "clip_signature", "embed_captions", "load_caption_encoder", "probe_video",
    "run_filters",
]
