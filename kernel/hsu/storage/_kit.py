"""The pieces :mod:`hsu.storage` exports (kept apart from the generated
``hsu.storage.v1``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from hsu.errors import InvalidValue
from hsu.ports import (
    MAX_KEY_BYTES,
    MAX_NAMESPACE,
    NAMESPACE,
    StorageCompacted,
    StorageEvent,
)

__all__ = [
    "MAX_TTL",
    "WatchHub",
    "check_key",
    "check_namespace",
    "check_ttl",
    "check_value",
    "key_range",
]

#: the longest TTL a put may ask for, in seconds (a year)
MAX_TTL = 366 * 86400.0


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not (
        NAMESPACE.fullmatch(namespace) and len(namespace) <= MAX_NAMESPACE
    ):
        raise InvalidValue(
            f"namespace: {namespace!r:.80} is not [A-Za-z0-9_.-] of at most {MAX_NAMESPACE}"
        )
    return namespace


def check_key(key: str, *, field: str = "key", empty: bool = False) -> bytes:
    """The key's UTF-8 bytes; a key is non-empty (a prefix may be) and at most
    :data:`hsu.ports.MAX_KEY_BYTES`."""
    if not isinstance(key, str):
        raise InvalidValue(f"{field}: must be a string, got {type(key).__name__}")
    raw = key.encode("utf-8", "surrogatepass")
    if not raw and not empty:
        raise InvalidValue(f"{field}: must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidValue(f"{field}: {len(raw)} bytes, over the {MAX_KEY_BYTES} a key may have")
    return raw


def check_value(value: bytes, max_bytes: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidValue(f"value: must be bytes, got {type(value).__name__}")
    if len(value) > max_bytes:
        raise InvalidValue(f"value: {len(value)} bytes, over storage.max_value_bytes ({max_bytes})")
    return bytes(value)


def check_ttl(ttl: float | None) -> float | None:
    """None or 0: no TTL; else seconds in (0, :data:`MAX_TTL`]."""
    if ttl is None or ttl == 0:
        return None
    if not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise InvalidValue(f"ttl: must be seconds in (0, {MAX_TTL:.0f}], got {ttl!r}")
    return float(ttl)


def key_range(prefix: bytes) -> tuple[bytes, bytes | None]:
    """The byte range ``[start, end)`` of the keys that start with ``prefix``
    (etcd's ``prefix_range_end``); ``end`` None: to the last key."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return prefix, bytes(end)
        end.pop()
    return prefix, None


class _Watcher:
    __slots__ = ("namespace", "overflow", "prefix", "queue")

    def __init__(self, namespace: str, prefix: str) -> None:
        self.namespace = namespace
        self.prefix = prefix
        self.queue: asyncio.Queue[StorageEvent | None] = asyncio.Queue()
        self.overflow = False


class WatchHub:
    """Delivers a storage's changes to its watchers in one process.

    The storage calls :meth:`publish` for each change, in revision order, on
    the event loop; :meth:`watch` replays what the storage still keeps
    (``backlog``) and then follows. A watcher that falls :attr:`MAX_BEHIND`
    changes behind ends with :class:`hsu.ports.StorageCompacted` (it lists
    again and watches from there), so a stuck watcher never holds memory
    without bound.
    """

    MAX_BEHIND = 4096

    def __init__(self) -> None:
        self._watchers: set[_Watcher] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._watchers)

    def publish(self, namespace: str, event: StorageEvent) -> None:
        for w in self._watchers:
            if w.namespace != namespace or not event.kv.key.startswith(w.prefix):
                continue
            if w.queue.qsize() >= self.MAX_BEHIND:
                w.overflow = True
                continue
            w.queue.put_nowait(event)

    def close(self) -> None:
        """End every watch (its iteration stops)."""
        self._closed = True
        for w in self._watchers:
            w.queue.put_nowait(None)

    async def watch(
        self,
        namespace: str,
        prefix: str,
        after: int,
        backlog: Callable[[], Awaitable[list[StorageEvent]]],
    ) -> AsyncIterator[StorageEvent]:
        """Changes above ``after`` (``backlog()`` gives the kept ones, in order,
        or raises :class:`StorageCompacted`), then live ones, never one twice."""
        if self._closed:
            return
        w = _Watcher(namespace, prefix)
        self._watchers.add(w)
        try:
            last = after
            if after > 0:
                for event in await backlog():
                    if event.revision > last:
                        last = event.revision
                        yield event
            while True:
                if w.overflow:
                    raise StorageCompacted(
                        f"watch of {namespace}/{prefix}: more than {self.MAX_BEHIND} changes"
                        " were not read; list again and watch from its revision",
                        last + 1,
                    )
                got = await w.queue.get()
                if got is None:
                    return
                if got.revision > last:
                    last = got.revision
                    yield got
        finally:
            self._watchers.discard(w)
            with contextlib.suppress(Exception):
                while not w.queue.empty():
                    w.queue.get_nowait()
