"""An in-memory tail of log records that StreamLogs serves from.

A loguru sink appends each record; followers on any event loop get new records
through an asyncio queue fed thread-safely, so loguru may log from any thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from typing import Any

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


class LogBuffer:
    def __init__(self, maxlen: int = 2000):
        self._records: collections.deque[Record] = collections.deque(maxlen=maxlen)
        self._followers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Record]]] = set()
        self._lock = threading.Lock()

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
        with self._lock:
            self._records.append(record)
            followers = list(self._followers)
        for loop, queue in followers:
            try:
                loop.call_soon_threadsafe(_offer, queue, record)
            except RuntimeError:  # that loop is closed; its follower is gone
                with self._lock:
                    self._followers.discard((loop, queue))

    def tail(self, n: int) -> list[Record]:
        with self._lock:
            return list(self._records)[-n:] if n > 0 else []

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

        queue: asyncio.Queue[Record] = asyncio.Queue(maxsize=10_000)
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            past = [r for r in self._records if wanted(r)][-tail:] if tail > 0 else []
            if follow:
                self._followers.add(entry)
        try:
            for record in past:
                yield record
            while follow:
                record = await queue.get()
                if wanted(record):
                    yield record
        finally:
            with self._lock:
                self._followers.discard(entry)


def _offer(queue: asyncio.Queue[Record], record: Record) -> None:
    """Drop the record for a follower too slow to keep up, rather than grow."""
    if not queue.full():
        queue.put_nowait(record)
