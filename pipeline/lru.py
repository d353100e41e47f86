"""A least-recently-used map bounded by the total size of its values (bytes, or 1 per entry for a count), with hit
and miss counts. Thread-safe: the engine's worker fills it while the HTTP side reads its counts. Used by the prompt
embedding cache, the prompt enhancer's rewrites and the reference K/V store."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, capacity: int, size_of: Callable[[V], int] = lambda value: 1):
        self.capacity = capacity
        self.size_of = size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.size = 0  # the values' total size
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None (a miss) when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: K, value: V) -> bool:
        """Keep `value`, evicting the least recently used entries past the capacity. A value larger than the whole
        capacity is not kept (False)."""
        size = self.size_of(value)
        if size > self.capacity:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._entries[key] = (value, size)
            self.size += size
            while self.size > self.capacity:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.size -= evicted
        return True

    def evict(self, size: int) -> int:
        """Drop least recently used entries until `size` has been freed or nothing is left; the size freed."""
        freed = 0
        with self._lock:
            while self._entries and freed < size:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.size -= evicted
                freed += evicted
        return freed

    def drop(self, which: Callable[[K], bool] = lambda key: True) -> None:
        """Forget the entries whose key `which` accepts (all by default)."""
        with self._lock:
            for key in [key for key in self._entries if which(key)]:
                self.size -= self._entries.pop(key)[1]
