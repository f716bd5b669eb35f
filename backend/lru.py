"""One least-recently-used map with a byte budget, thread-safe: the server's caches (image
features, decoded task images, parsed labeling configs) are all bounded by the memory they
hold, not by a count of entries (64 small configs and 64 ten-megabyte ones differ)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """At most ``max_bytes`` of entries, each costing ``size(key, value)`` bytes; an entry
    larger than the whole budget is not kept. ``hits`` and ``misses`` count lookups."""

    def __init__(self, max_bytes: int, size: Callable[[K, V], int]) -> None:
        self.max_bytes = max_bytes
        self.size = size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        # An empty cache is still a cache: `if cache:` must not mean `if cache is not empty`.
        return True

    def __contains__(self, key: K) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        """Bytes currently held (by ``size``)."""
        return self._bytes

    def get(self, key: K) -> V | None:
        """The value (now most recently used), or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: K, value: V) -> None:
        """Stores ``value``, evicting the least recently used entries to stay in budget."""
        nbytes = self.size(key, value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
