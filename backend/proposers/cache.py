"""An explicit, thread-safe LRU cache of image features with a byte budget.

Keys are (image content hash, proposer cache key): the same pixels through the same proposer
hit the cache whatever the file name or URL, and another proposer never sees them. Values are
immutable :class:`Features`, so sharing them between threads is safe.

An image is hashed once: a read-only array whose pixels nothing can change (``images.load_rgb``
decodes into such arrays: read-only views of immutable ``bytes``; :func:`freeze` makes one)
keeps its hash for as long as it lives, so the composite methods' several caches and encoders
(the dense method, SAM, the refined maps) do not hash it again.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
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


_keys: dict[int, tuple[weakref.ref[NDArray[Any]], str]] = {}  # id -> (array, hash)
_keys_lock = threading.Lock()


def freeze(image: NDArray[Any]) -> NDArray[Any]:
    """``image`` made read-only (in place) and returned: its hash is then computed once."""
    image.flags.writeable = False
    return image


def image_key(image: NDArray[Any]) -> str:
    """sha256 of an image's shape, dtype and pixels (hex); remembered for a read-only array
    over pixels nothing can change (its own, or immutable ``bytes``)."""
    stable = not image.flags.writeable and (image.base is None or isinstance(image.base, bytes))
    if stable:
        with _keys_lock:
            known = _keys.get(id(image))
        if known is not None and known[0]() is image:
            return known[1]
    digest = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).data)
    key = digest.hexdigest()
    if stable:
        ident = id(image)

        def forget(_: object) -> None:
            _forget(ident)

        ref = weakref.ref(image, forget)
        with _keys_lock:
            _keys[ident] = (ref, key)
    return key


def _forget(ident: int) -> None:
    with _keys_lock:
        entry = _keys.get(ident)
        if entry is not None and entry[0]() is None:
            del _keys[ident]


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
