"""An explicit, thread-safe LRU cache of image features with a byte budget.

Keys are (image content hash, proposer cache key): the same pixels through the same proposer
hit the cache whatever the file name or URL, and another proposer never sees them. Values are
immutable :class:`Features`, so sharing them between threads is safe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary

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


class FeatureCache:
    """LRU of Features keyed by (image hash, proposer key), at most ``max_bytes`` in total.

    An entry larger than the whole budget is not stored. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], Features] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        # An empty cache is still a cache: `if cache:` must not mean `if cache is not empty`.
        return True

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def get(self, key: tuple[str, str]) -> Features | None:
        """The entry (now most recently used), or None."""
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: tuple[str, str], features: Features) -> None:
        """Stores an entry, evicting least recently used ones to stay within budget."""
        size = features.nbytes
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            self._items[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

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
