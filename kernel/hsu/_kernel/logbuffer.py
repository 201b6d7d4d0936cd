"""An in-memory ring of log records that StreamLogs serves from.

A loguru sink appends each record, from any thread, to one ring where it gets
the next sequence number. A follower is a cursor into that ring, not a queue:
appending a line costs the same whatever the number of followers. Followers
on one event loop that want the same records (every record, one unit's or one
instance's) wait on one shared ``asyncio.Event``, set once per batch: the
first record appended after a wake-up schedules the next one (one
``call_soon``, or ``call_soon_threadsafe`` from another thread), the rest of
the batch only lands in the ring. Woken, each follower reads forward from its
cursor. One that fell behind by more than the ring holds (a client that does
not read) jumps to the oldest record still there and is first given a
``WARNING`` record saying how many it skipped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import attrs

LEVELS = {
    "TRACE": 5,
    "DEBUG": 10,
    "INFO": 20,
    "SUCCESS": 25,
    "WARNING": 30,
    "ERROR": 40,
    "CRITICAL": 50,
}

#: the least the ring holds for followers, however few records ``tail`` keeps
RING_MIN = 1024
#: ``origin`` of the record that tells a follower it skipped records
SKIPPED_ORIGIN = "hsu.logbuffer"

T = TypeVar("T")


@attrs.frozen
class Record:
    time: float
    level: str
    message: str
    origin: str = ""
    extra: dict[str, str] = attrs.field(factory=dict)
    stream: str = ""

    @property
    def levelno(self) -> int:
        return LEVELS.get(self.level, 0)


def skipped_record(n: int) -> Record:
    """What a follower that fell ``n`` records behind the ring is told."""
    return Record(
        time=time.time(),
        level="WARNING",
        message=f"{n} log records skipped: this stream fell behind",
        origin=SKIPPED_ORIGIN,
        extra={"skipped": str(n)},
    )


class Ring(Generic[T]):
    """The last ``capacity`` items appended, each numbered by the sequence
    number it got (0, 1, 2...). Not locked: its owner locks it if need be."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: list[T | None] = [None] * self.capacity
        #: the sequence number the next item gets
        self.next = 0

    @property
    def oldest(self) -> int:
        """The sequence number of the oldest item still held."""
        return max(0, self.next - self.capacity)

    def append(self, item: T) -> int:
        seq = self.next
        self._items[seq % self.capacity] = item
        self.next = seq + 1
        return seq

    def since(self, seq: int) -> tuple[int, list[T]]:
        """(how many items from ``seq`` on are no longer held, the held ones
        from ``seq`` on, oldest first)."""
        start = max(seq, self.oldest)
        end = self.next
        if start >= end:
            return start - seq, []
        i, j = start % self.capacity, end % self.capacity
        got = self._items[i:j] if i < j else self._items[i:] + self._items[:j]
        return start - seq, got  # type: ignore[return-value]  # all set: held


class _Hub:
    """The followers of one event loop, by key ("" for all records,
    ``u:<unit>``, ``i:<instance>``)."""

    __slots__ = ("counts", "dirty", "events", "loop", "scheduled", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.thread = threading.get_ident()  # the loop's: followers run on it
        self.counts: dict[str, int] = {}  # followers per key (under the buffer's lock)
        self.dirty: set[str] = set()  # keys with records since the last wake-up (lock)
        self.scheduled = False  # a wake-up is scheduled (lock)
        self.events: dict[str, asyncio.Event] = {}  # touched on the loop only


class LogBuffer:
    """The last ``maxlen`` records for ``tail``, in a ring of at least
    ``RING_MIN`` that followers read from."""

    def __init__(self, maxlen: int = 2000):
        self.maxlen = maxlen
        self._ring: Ring[Record] = Ring(max(maxlen, RING_MIN))
        self._hubs: dict[asyncio.AbstractEventLoop, _Hub] = {}
        self._lock = threading.Lock()
        #: bumped by :meth:`end_followers`: a follower of an older one ends
        self._generation = 0

    def sink(self, message: Any) -> None:
        """A loguru sink: ``logger.add(buffer.sink)``."""
        r = message.record
        extra = {str(k): str(v) for k, v in r["extra"].items() if not k.startswith("_")}
        self.append(
            Record(
                time=r["time"].timestamp(),
                level=r["level"].name,
                message=r["message"],
                origin=f"{r['name']}:{r['function']}:{r['line']}",
                extra=extra,
                stream=str(r["extra"].get("stream", "")),
            )
        )

    def append(self, record: Record) -> None:
        """Add ``record``; from any thread. O(1) whatever the number of followers:
        at most one wake-up scheduled per event loop with followers."""
        wake: list[_Hub] = []
        with self._lock:
            self._ring.append(record)
            if not self._hubs:
                return
            extra = record.extra
            keys = ("", f"u:{extra.get('unit', '')}", f"i:{extra.get('instance', '')}")
            for hub in self._hubs.values():
                for key in keys:
                    if key in hub.counts:
                        hub.dirty.add(key)
                if hub.dirty and not hub.scheduled:
                    hub.scheduled = True
                    wake.append(hub)
        for hub in wake:
            try:
                if threading.get_ident() == hub.thread:
                    hub.loop.call_soon(self._wake, hub)
                else:
                    hub.loop.call_soon_threadsafe(self._wake, hub)
            except RuntimeError:  # that loop is closed: its followers are gone
                with self._lock:
                    if self._hubs.get(hub.loop) is hub:
                        del self._hubs[hub.loop]

    def _wake(self, hub: _Hub) -> None:
        """On ``hub``'s loop: wake the followers of the keys that got records."""
        with self._lock:
            keys, hub.dirty = hub.dirty, set()
            hub.scheduled = False
        for key in keys:
            event = hub.events.pop(key, None)
            if event is not None:
                event.set()

    def end_followers(self) -> None:
        """End every follow stream open now, once it has what was logged so
        far (a stopping kernel's ``hsu logs -f`` ends instead of holding its
        server open for the drain grace). On the followers' loop."""
        with self._lock:
            self._generation += 1
            hub = self._hubs.get(asyncio.get_running_loop())
            events = list(hub.events.values()) if hub is not None else []
            if hub is not None:
                hub.events.clear()
        for event in events:
            event.set()

    def tail(self, n: int) -> list[Record]:
        with self._lock:
            return self._last(n)

    def _last(self, n: int) -> list[Record]:
        n = min(n, self.maxlen)
        if n <= 0:
            return []
        return self._ring.since(self._ring.next - n)[1]

    async def stream(
        self,
        tail: int,
        follow: bool,
        min_level: str = "",
        *,
        unit: str = "",
        instance: str = "",
    ) -> AsyncIterator[Record]:
        """Records, the last ``tail`` first; only those bound to ``unit`` or
        ``instance`` when given (``tail`` counts the matching ones)."""
        floor = LEVELS.get(min_level.upper(), 0) if min_level else 0

        def wanted(r: Record) -> bool:
            return (
                r.levelno >= floor
                and (not unit or r.extra.get("unit") == unit)
                and (not instance or r.extra.get("instance") == instance)
            )

        key = f"i:{instance}" if instance else f"u:{unit}" if unit else ""
        loop = asyncio.get_running_loop()
        hub: _Hub | None = None
        with self._lock:
            kept = self._last(self.maxlen) if tail > 0 else []
            cursor = self._ring.next
            generation = self._generation
            if follow:
                hub = self._hubs.get(loop)
                if hub is None:
                    hub = self._hubs[loop] = _Hub(loop)
                hub.counts[key] = hub.counts.get(key, 0) + 1
        try:
            for record in [r for r in kept if wanted(r)][-tail:] if tail > 0 else ():
                yield record
            while hub is not None:
                with self._lock:
                    skipped, batch = self._ring.since(cursor)
                    cursor = self._ring.next
                if skipped:
                    yield skipped_record(skipped)
                if batch:
                    for record in batch:
                        if wanted(record):
                            yield record
                    continue
                # nothing new: wait for the next batch (the check above and this
                # wait are on the loop, where wake-ups run: none is missed)
                if self._generation != generation:
                    return
                event = hub.events.get(key)
                if event is None:
                    event = hub.events[key] = asyncio.Event()
                await event.wait()
        finally:
            if hub is not None:
                with self._lock:
                    left = hub.counts[key] - 1
                    if left:
                        hub.counts[key] = left
                    else:
                        del hub.counts[key]
                        hub.dirty.discard(key)
                        if not hub.counts and self._hubs.get(loop) is hub:
                            del self._hubs[loop]
