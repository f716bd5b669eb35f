"""An explicit, thread-safe LRU cache of image features with a byte budget.

Keys are (image content hash, proposer cache key): the same pixels through the same proposer
hit the cache whatever the file name or URL, and another proposer never sees them. Values are
immutable :class:`Features`, so sharing them between threads is safe.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary

from ..lru import ByteLRU
from .base import Features, Proposal, Proposer


class Encoder(Protocol):
    """Anything whose image work can be cached: proposers, ``SamEncoder``."""

    @property
    def cache_key(self) -> str: ...

    def encode(self, image: NDArray[Any]) -> Features: ...


def image_key(image: NDArray[Any]) -> str:
    """sha256 of an image's shape, dtype and pixels (hex)."""
    digest = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class FeatureCache(ByteLRU[tuple[str, str], Features]):
    """LRU of Features keyed by (image hash, proposer key), at most ``max_bytes`` in total.

    An entry larger than the whole budget is not stored. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        super().__init__(max_bytes, lambda _, features: features.nbytes)

    def features(self, proposer: Encoder, image: NDArray[Any]) -> Features:
        """Cached features of ``image``, encoding on a miss.

        Two threads missing the same key at once both encode (no lock is held while encoding,
        so one slow image never blocks others); the results are equal.
        """
        key = (image_key(image), proposer.cache_key)
        cached = self.get(key)
        if cached is not None:
            return cached
        features = proposer.encode(image)
        self.put(key, features)
        return features


def propose(
    proposer: Proposer, image: NDArray[Any], vocabulary: Vocabulary, cache: FeatureCache | None
) -> Proposal:
    """``score(encode(image))`` with features from ``cache`` when given."""
    features = cache.features(proposer, image) if cache is not None else proposer.encode(image)
    return proposer.score(features, vocabulary)
