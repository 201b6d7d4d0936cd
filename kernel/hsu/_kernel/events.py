"""Events: every state transition of the kernel and its instances, in order.

The kernel publishes; ``Kernel.WatchEvents`` subscribers and plugins (the
``hsu_instance_event`` hook) receive. A subscriber that falls behind by more
than its queue loses the oldest events and is told how many it lost, so a
slow reader never holds back the kernel.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable

from hsu.ports import Event

RECENT = 1000
QUEUE = 10_000


class EventBus:
    def __init__(self, recent: int = RECENT):
        self._seq = 0
        self.recent: collections.deque[Event] = collections.deque(maxlen=recent)
        self._subscribers: set[_Subscriber] = set()
        #: called synchronously for each event; must not raise
        self.listeners: list[Callable[[Event], None]] = []

    def publish(self, kind: str, **fields: object) -> Event:
        self._seq += 1
        event = Event(self._seq, kind, **fields)  # type: ignore[arg-type]
        self.recent.append(event)
        for sub in self._subscribers:
            sub.put(event)
        for listener in self.listeners:
            listener(event)
        return event

    async def subscribe(
        self, *, replay: bool = False, unit: str = ""
    ) -> AsyncIterator[Event | int]:
        """Events as they happen (after the recent ones if ``replay``).

        Yields an ``int`` (how many were lost) when this subscriber fell behind.
        """
        sub = _Subscriber()
        if replay:
            for event in self.recent:
                sub.put(event)
        self._subscribers.add(sub)
        try:
            while True:
                item = await sub.get()
                if isinstance(item, int) or not unit or item.unit == unit:
                    yield item
        finally:
            self._subscribers.discard(sub)


class _Subscriber:
    def __init__(self) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._lost = 0
        self._wake = asyncio.Event()

    def put(self, event: Event) -> None:
        if len(self._items) >= QUEUE:
            self._items.popleft()
            self._lost += 1
        self._items.append(event)
        self._wake.set()

    async def get(self) -> Event | int:
        while not self._items and not self._lost:
            self._wake.clear()
            await self._wake.wait()
        if self._lost:
            lost, self._lost = self._lost, 0
            return lost
        return self._items.popleft()
