"""Events: every state transition of the kernel and its instances, in order.

The kernel publishes; ``Kernel.WatchEvents`` subscribers and plugins (the
``hsu_instance_event`` hook) receive. Events go into one ring (``BACKLOG``
of them) and a subscriber is a cursor into it, so publishing costs the same
whatever the number of subscribers: they wait on one shared
``asyncio.Event``, set once per batch of events (one ``call_soon`` scheduled
by the first event after a wake-up). A subscriber that falls behind by more
than the ring loses the oldest events and is told how many it lost, so a
slow reader never holds back the kernel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from hsu._kernel.logbuffer import Ring
from hsu.ports import Event

RECENT = 1000  # replayed to a subscriber that asks for them
BACKLOG = 4096  # how far behind a subscriber may fall before it loses events


class EventBus:
    def __init__(self, recent: int = RECENT, backlog: int = BACKLOG):
        self._seq = 0
        self._recent = recent
        self._ring: Ring[Event] = Ring(max(recent, backlog))
        self._subscribers = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the subscribers'
        self._thread = 0  # that loop's
        self._scheduled = False
        self._wake = asyncio.Event()  # replaced at each wake-up; made on first wait
        self._lock = threading.Lock()
        #: called synchronously for each event; must not raise
        self.listeners: list[Callable[[Event], None]] = []
        #: bumped by :meth:`close`: a subscriber of an older one ends
        self._generation = 0

    @property
    def recent(self) -> list[Event]:
        """The last ``recent`` events, oldest first."""
        return self._ring.since(self._ring.next - self._recent)[1]

    def publish(self, kind: str, **fields: object) -> Event:
        self._seq += 1
        event = Event(self._seq, kind, **fields)  # type: ignore[arg-type]
        with self._lock:
            self._ring.append(event)
            loop = self._loop if self._subscribers and not self._scheduled else None
            self._scheduled = self._scheduled or loop is not None
        if loop is not None:
            try:
                if threading.get_ident() == self._thread:
                    loop.call_soon(self._notify)
                else:
                    loop.call_soon_threadsafe(self._notify)
            except RuntimeError:  # that loop is closed: its subscribers are gone
                self._scheduled = False
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        """End every subscription open now, after the events already published
        (a stopping kernel's watchers get its last transitions, then the end
        of the stream, instead of holding its server open for the drain grace).
        Later subscriptions work as before. On the subscribers' loop."""
        with self._lock:
            self._generation += 1
            loop = self._loop if self._subscribers else None
        if loop is not None:
            self._notify()

    def _notify(self) -> None:
        with self._lock:
            self._scheduled = False
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def subscribe(
        self, *, replay: bool = False, unit: str = ""
    ) -> AsyncIterator[Event | int]:
        """Events as they happen (after the recent ones if ``replay``).

        Yields an ``int`` (how many were lost) when this subscriber fell behind.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop:
                # one loop at a time: a bus outlives the loop of a stopped kernel
                self._loop, self._thread = loop, threading.get_ident()
                self._wake = asyncio.Event()
                self._scheduled = False
            self._subscribers += 1
            generation = self._generation
            cursor = self._ring.next
            if replay:
                cursor = max(self._ring.oldest, cursor - self._recent)
        try:
            while True:
                with self._lock:
                    lost, batch = self._ring.since(cursor)
                    cursor = self._ring.next
                if lost:
                    yield lost
                for event in batch:
                    if not unit or event.unit == unit:
                        yield event
                if not batch:
                    if self._generation != generation:
                        return
                    await self._wake.wait()
        finally:
            with self._lock:
                self._subscribers -= 1
