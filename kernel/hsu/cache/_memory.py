"""The in-process cache: :class:`MemoryCache`, LRU bounded in bytes, with TTLs."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from hsu.ports import Cached, CacheStats

#: bytes counted for one entry besides its key and value (the dict slot,
#: the tuple, the two objects' headers), so a flood of tiny values is bounded too
ENTRY_OVERHEAD = 96


class MemoryCache:
    """:class:`hsu.ports.Cache` in this process: at most ``max_bytes`` of
    keys, values and :data:`ENTRY_OVERHEAD` each, the least recently used
    evicted first to make room; a value larger than ``max_entry_bytes`` is
    not kept. A value past its TTL is a miss and is dropped when met.

    Every method also has a synchronous twin (``get_now``, ``set_now``,
    ``delete_now``) for a blocking caller; none does I/O, and each holds a
    lock, so threads may share one (``hsu.connect_sync``'s channel).
    """

    def __init__(self, max_bytes: int = 64 * 2**20, max_entry_bytes: int | None = None):
        if max_bytes < 1:
            raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes if max_entry_bytes is None else max_entry_bytes
        #: key -> (value, expires at on the monotonic clock, or 0 for never)
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def describe(self) -> str:
        return f"memory ({self.max_bytes} bytes)"

    @staticmethod
    def _size(key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def get_now(self, key: str) -> Cached | None:
        with self._lock:
            return self._get(key)

    def _get(self, key: str) -> Cached | None:
        item = self._items.get(key)
        if item is not None:
            value, expires = item
            if not expires:
                self._items.move_to_end(key)
                self.hits += 1
                return Cached(value, None)
            left = expires - time.monotonic()
            if left > 0:
                self._items.move_to_end(key)
                self.hits += 1
                return Cached(value, left)
            self._drop(key)
        self.misses += 1
        return None

    def set_now(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        with self._lock:
            self._set(key, bytes(value), ttl)

    def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        size = self._size(key, value)
        if key in self._items:
            self._drop(key)
        if size > self.max_entry_bytes or size > self.max_bytes or (ttl is not None and ttl <= 0):
            return
        self._make_room(size)
        expires = time.monotonic() + ttl if ttl is not None else 0.0
        self._items[key] = (value, expires)
        self._bytes += size

    def delete_now(self, key: str) -> bool:
        with self._lock:
            if key not in self._items:
                return False
            self._drop(key)
            return True

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self._bytes -= self._size(key, value)

    def _make_room(self, size: int) -> None:
        """Evict from the least recently used end until ``size`` more fits;
        entries found expired on the way go without counting as evictions."""
        items = self._items
        now = time.monotonic()
        while items and self._bytes + size > self.max_bytes:
            key, (_, expires) = next(iter(items.items()))
            self._drop(key)
            if not expires or expires > now:
                self.evictions += 1

    async def get(self, key: str) -> Cached | None:
        return self.get_now(key)

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        self.set_now(key, value, ttl=ttl)

    async def delete(self, key: str) -> bool:
        return self.delete_now(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            entries=len(self._items),
            bytes=self._bytes,
        )

    async def close(self) -> None:
        self.clear()
