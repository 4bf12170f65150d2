"""Near-duplicate removal with perceptual hashes, across the whole dataset.

A clip's signature is the concatenation of the pHashes (imagehash.phash) of a few
evenly spaced frames; two clips are near-duplicates when the Hamming distance of their
signatures is at most `max_distance`. Re-encodes, small shifts and rescales stay close;
different content lands near half the bits apart. Crops beyond a few percent, flips
and overlays defeat pHash; Movie Gen's copy-detection embeddings would catch those.

`DuplicateIndex` finds matches without scanning everything: by the pigeonhole
principle, signatures within distance d agree exactly on at least one of d + 1 bands of
bits, so candidates come from d + 1 dictionary lookups.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import imagehash
import numpy as np
from PIL import Image

from .clip import Clip, Decision


def clip_signature(clip: Clip, num_frames: int = 3, hash_size: int = 8) -> int:
    """pHashes of `num_frames` evenly spaced luma frames, concatenated into one int."""
    luma = clip.luma()
    picks = np.linspace(0, len(luma) - 1, num_frames).round().astype(int)
    signature = 0
    for i in picks:
        bits = imagehash.phash(Image.fromarray(luma[i]), hash_size=hash_size).hash.flatten()
        for bit in bits:
            signature = (signature << 1) | int(bit)
    return signature


class DuplicateIndex:
    """Signatures of `bits` bits seen so far; `query` finds one within `max_distance`."""

    def __init__(self, bits: int, max_distance: int):
        self.bits, self.max_distance = bits, max_distance
        num_bands = max_distance + 1
        edges = np.linspace(0, bits, num_bands + 1).round().astype(int)
        self._bands = [(int(a), int(b)) for a, b in zip(edges, edges[1:], strict=False)]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self.keys: list[str] = []
        self.signatures: list[int] = []

    def _band_values(self, signature: int) -> list[int]:
        return [(signature >> a) & ((1 << (b - a)) - 1) for a, b in self._bands]

    def query(self, signature: int) -> tuple[str, int] | None:
        """(key, distance) of the closest stored signature within max_distance, or None."""
        best = None
        for table, value in zip(self._tables, self._band_values(signature), strict=True):
            for idx in table.get(value, ()):
                dist = (self.signatures[idx] ^ signature).bit_count()
                if dist <= self.max_distance and (best is None or dist < best[1]):
                    best = (self.keys[idx], dist)
        return best

    def add(self, key: str, signature: int) -> None:
        idx = len(self.keys)
        self.keys.append(key)
        self.signatures.append(signature)
        for table, value in zip(self._tables, self._band_values(signature), strict=True):
            table.setdefault(value, []).append(idx)

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, path: str | os.PathLike) -> None:
        """Write keys and signatures as json (hex), so a later job can extend the index."""
        state = {
            "bits": self.bits, "max_distance": self.max_distance,
            "items": [[k, f"{s:x}"] for k, s in zip(self.keys, self.signatures, strict=True)],
        }
        with open(path, "w") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DuplicateIndex:
        with open(path) as f:
            state = json.load(f)
        index = cls(state["bits"], state["max_distance"])
        for key, hex_sig in state["items"]:
            index.add(key, int(hex_sig, 16))
        return index


@dataclass
class DuplicateFilter:
    """Drops a clip whose signature is within `max_distance` of one already kept.

    Order matters (the first of a duplicate group is kept), so run it after the other
    filters and in a deterministic order; share `index` across shards for a global pass.
    """

    max_distance: int = 12
    num_frames: int = 3
    hash_size: int = 8
    index: DuplicateIndex | None = field(default=None, repr=False)
    name = "duplicates"

    def __post_init__(self):
        if self.index is None:
            self.index = DuplicateIndex(self.num_frames * self.hash_size**2, self.max_distance)

    def __call__(self, clip: Clip) -> Decision:
        signature = clip_signature(clip, self.num_frames, self.hash_size)
        scores = {"phash": f"{signature:0{self.index.bits // 4}x}"}
        match = self.index.query(signature)
        if match is not None:
            other, dist = match
            scores.update(duplicate_of=other, duplicate_distance=dist)
            return Decision(False, f"near-duplicate of {other} (distance {dist})", scores)
        self.index.add(clip.key, signature)
        return Decision(True, "ok", scores)
