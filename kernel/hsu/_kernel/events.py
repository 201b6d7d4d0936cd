"""Events: every state transition of the kernel and its instances, and what
the kernel, plugins and HSUs publish on named topics, in order.

Every event has a topic (``instance.ready``, ``worker.started``,
``config.changed``, a plugin's or an HSU's own); a subscriber names the
topics it wants (names or globs). The kernel, plugins
(``KernelAPI.publish``) and HSUs (``Kernel.PublishEvent``) publish;
``Kernel.WatchEvents`` subscribers, plugins (``KernelAPI.subscribe``, the
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
import fnmatch
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from hsu._kernel.logbuffer import Ring
from hsu.ports import Event

RECENT = 1000  # replayed to a subscriber that asks for them
BACKLOG = 4096  # how far behind a subscriber may fall before it loses events
#: topics only the kernel publishes: a plugin or an HSU cannot pass for it
RESERVED = ("kernel", "instance", "worker", "service", "config", "reload")
#: topics of the kernel's plugins (the built-in ``limits`` watcher's): a
#: plugin may publish them, an HSU cannot pass for one
PLUGINS_OWN = ("limits",)


def topic_of(kind: str, to_state: str) -> str:
    """The topic of a transition or a check: ``instance.ready``, ``limits``."""
    return f"{kind}.{to_state}" if to_state else kind


#: an instance's states in which its process runs
_RUNNING = frozenset({"starting", "ready", "stopping"})
_ENDED = frozenset({"stopped", "backoff", "fatal"})


def worker_topic(source: str, target: str) -> str:
    """The ``worker.*`` topic an instance's transition also publishes, or "":
    ``worker.started`` when it became ready, ``worker.stopped`` when its
    process ended (stopped, or exited into backoff or fatal)."""
    if target == "ready":
        return "worker.started"
    if target in _ENDED and source in _RUNNING:
        return "worker.stopped"
    return ""


def reserved(topic: str, *, by_hsu: bool = False) -> bool:
    """Whether ``topic`` is one of the kernel's own (for an HSU: or one of
    its plugins')."""
    head = topic.split(".", 1)[0]
    return head in RESERVED or (by_hsu and head in PLUGINS_OWN)


def matcher(patterns: Iterable[str]) -> Callable[[str], bool] | None:
    """A test for topics matching any of ``patterns`` (names or ``fnmatch``
    globs: ``worker.*``); None (everything) without patterns."""
    found = tuple(patterns)
    if not found or "*" in found:
        return None
    match = re.compile("|".join(fnmatch.translate(p) for p in found)).match
    return lambda topic: match(topic) is not None


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

    def publish(
        self, kind: str, *, topic: str = "", data: Mapping[str, str] | None = None, **fields: object
    ) -> Event:
        """Append one event; ``topic`` defaults to ``kind.to_state`` (or ``kind``)."""
        self._seq += 1
        topic = topic or topic_of(kind, str(fields.get("to_state", "")))
        event = Event(self._seq, kind, **fields, topic=topic, data=dict(data or {}))  # type: ignore[arg-type]
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
        self, *, replay: bool = False, unit: str = "", topics: Iterable[str] = ()
    ) -> AsyncIterator[Event | int]:
        """Events as they happen (after the recent ones if ``replay``), of
        ``unit`` and matching ``topics`` (names or globs) when given.

        Yields an ``int`` (how many were lost) when this subscriber fell behind.
        """
        wanted = matcher(topics)
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
                    if (not unit or event.unit == unit) and (wanted is None or wanted(event.topic)):
                        yield event
                if not batch:
                    if self._generation != generation:
                        return
                    await self._wake.wait()
        finally:
            with self._lock:
                self._subscribers -= 1
