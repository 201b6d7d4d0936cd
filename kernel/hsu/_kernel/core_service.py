"""The Core servicer, shared by the kernel and the Python HSU SDK."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from hsu._kernel.logbuffer import LEVELS, LogBuffer, Record
from hsu._version import __version__
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.metrics import Family, Point

CORE_SERVICE = "hsu.core.v1.Core"
RUNTIME = f"hsu-python/{__version__}"
#: how many streams of one kind (StreamLogs with follow, WatchEvents,
#: WatchEndpoints) a process serves at once; one more is refused
MAX_STREAMS = 64


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def log_record_pb(record: Record) -> core_pb2.LogRecord:
    return core_pb2.LogRecord(
        time=timestamp(record.time),
        level=record.level,
        message=record.message,
        origin=record.origin,
        extra=record.extra,
        stream=record.stream,
    )


class StreamLimit:
    """At most ``limit`` streams of one kind open at once (``MAX_STREAMS`` as
    it is when made, unless given); one more gets RESOURCE_EXHAUSTED. Used on
    one event loop."""

    def __init__(self, what: str, limit: int | None = None):
        self.what = what
        self.limit = MAX_STREAMS if limit is None else limit
        self.open = 0

    @contextlib.asynccontextmanager
    async def hold(self, context: Any) -> AsyncIterator[None]:
        """One of them, for the life of a stream; aborts the call if none is left."""
        if self.open >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.what}: {self.open} streams open, the most this process serves;"
                " close one and retry",
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class CoreServicer(core_pb2_grpc.CoreServicer):
    """Ping, Info, Shutdown and StreamLogs for one process.

    :param info: returns the current :class:`core_pb2.InfoResponse` fields.
    :param shutdown: called with (grace seconds, reason); starts the stop and
        returns at once.
    """

    def __init__(
        self,
        info: Callable[[], dict[str, Any]],
        shutdown: Callable[[float, str], None],
        logs: LogBuffer,
        default_grace: float = 5.0,
        metrics: Callable[[Collection[str] | None, bool], Awaitable[list[Family]]] | None = None,
    ):
        #: what Metrics answers, given the names asked for (None: all) and
        #: whether only the process's own series (``local``); default: this
        #: process's ``hsu.metrics.REGISTRY``
        self._metrics = metrics
        self._info = info
        self._shutdown = shutdown
        self._logs = logs
        self._default_grace = default_grace
        self.started_at = time.time()
        #: the StreamLogs calls with ``follow`` open at once
        self.followers = StreamLimit("StreamLogs with follow")

    async def Ping(self, request: core_pb2.PingRequest, context: Any) -> core_pb2.PingResponse:
        return core_pb2.PingResponse(payload=request.payload, time=timestamp(time.time()))

    async def Info(self, request: core_pb2.InfoRequest, context: Any) -> core_pb2.InfoResponse:
        fields: dict[str, Any] = {
            "pid": os.getpid(),
            "runtime": RUNTIME,
            "started_at": timestamp(self.started_at),
        }
        fields.update(self._info())
        return core_pb2.InfoResponse(**fields)

    async def Shutdown(
        self, request: core_pb2.ShutdownRequest, context: Any
    ) -> core_pb2.ShutdownResponse:
        grace = self._default_grace
        if request.HasField("grace"):
            grace = request.grace.ToNanoseconds() / 1e9
            if grace < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "grace must not be negative")
        self._shutdown(grace, request.reason or "Core.Shutdown")
        return core_pb2.ShutdownResponse(accepted=True)

    async def StreamLogs(
        self, request: core_pb2.StreamLogsRequest, context: Any
    ) -> AsyncIterator[core_pb2.LogRecord]:
        if request.min_level and request.min_level.upper() not in LEVELS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_level {request.min_level!r} is not one of {', '.join(LEVELS)}",
            )
        records = self._logs.stream(
            request.tail,
            request.follow,
            request.min_level,
            unit=request.unit,
            instance=request.instance_id,
        )
        async with self.followers.hold(context) if request.follow else contextlib.nullcontext():
            async for record in records:
                yield log_record_pb(record)

    async def Metrics(
        self, request: core_pb2.MetricsRequest, context: Any
    ) -> core_pb2.MetricsResponse:
        names = frozenset(request.families) or None
        if self._metrics is not None:
            families = await self._metrics(names, request.local)
        else:
            from hsu.metrics import REGISTRY

            families = REGISTRY.collect(names)
        return families_pb(families)


def families_pb(families: list[Family]) -> core_pb2.MetricsResponse:
    """Collected families as Core.Metrics answers them."""
    return core_pb2.MetricsResponse.FromString(families_wire(families))


_double = struct.Struct("<d").pack
_ZERO = _double(0.0)


#: a varint below 128 is its one byte
_SMALL = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field; empty (proto3's default): nothing."""
    return tag + _varint(len(data)) + data if data else b""


def families_wire(families: Iterable[Family]) -> bytes:
    """A ``MetricsResponse`` of these families as its bytes, written out:
    with 1,000 instances, about half the time of upb's ``add()`` per point
    and label (docs/benchmarks.md, "`hsu status` with 1,000 running"), the
    parse into the reply included. The same bytes as upb's serialization of the message
    (fields in number order, proto3 defaults left out; tests/test_metrics.py
    compares them). A point's labels are written once per tuple (the
    kernel's per-instance families share one), with the point's head."""
    #: labels -> (their bytes, the point without a value, its head before a
    #: value's 8 bytes)
    heads: dict[tuple[tuple[str, str], ...], tuple[bytes, bytes, bytes]] = {}
    pairs: dict[tuple[str, str], bytes] = {}
    out = []
    for fam in families:
        points: list[bytes] = []
        add = points.append
        for p in fam.points:
            head = heads.get(p.labels)
            if head is None:
                labels = b""
                for pair in p.labels:
                    label = pairs.get(pair)
                    if label is None:
                        data = _field(b"\x0a", pair[0].encode()) + _field(b"\x12", pair[1].encode())
                        label = pairs[pair] = b"\x0a" + _varint(len(data)) + data
                    labels += label
                head = heads[p.labels] = (
                    labels,
                    b"\x22" + _varint(len(labels)) + labels,
                    b"\x22" + _varint(len(labels) + 9) + labels + b"\x11",
                )
            value = _double(p.value)
            if p.buckets or p.count:
                add(_point(head[0], value, p))
            elif value == _ZERO:
                add(head[1])
            else:
                add(head[2] + value)
        data = (
            _field(b"\x0a", fam.name.encode())
            + _field(b"\x12", fam.kind.encode())
            + _field(b"\x1a", fam.help.encode())
            + b"".join(points)
        )
        out.append(b"\x0a" + _varint(len(data)) + data)
    return b"".join(out)


def _point(labels: bytes, value: bytes, p: Point) -> bytes:
    """A histogram's point (:func:`families_wire`)."""
    body = labels + (b"\x11" + value if value != _ZERO else b"")
    for bound, n in p.buckets:
        upper = _double(bound)
        bucket = (b"\x09" + upper if upper != _ZERO else b"") + (b"\x10" + _varint(n) if n else b"")
        body += b"\x1a" + _varint(len(bucket)) + bucket
    if p.count:
        body += b"\x20" + _varint(p.count)
    return b"\x22" + _varint(len(body)) + body


#: a family's kinds, as Core.Metrics may name them
KINDS = ("counter", "gauge", "histogram")


def families_from_pb(msg: core_pb2.MetricsResponse) -> list[Family]:
    """Core.Metrics's answer as families; a family of an unknown kind, or a
    bad name, is skipped (it came from another process)."""
    from hsu.metrics import Point

    out: list[Family] = []
    for f in msg.families[:MAX_FAMILIES]:
        if f.kind not in KINDS or not _NAME.fullmatch(f.name):
            continue
        points = tuple(
            Point(
                tuple((lb.name, lb.value) for lb in p.labels if _NAME.fullmatch(lb.name)),
                p.value,
                tuple((b.upper_bound, b.count) for b in p.buckets),
                p.count,
            )
            for p in f.points[:MAX_POINTS]
        )
        out.append(Family(f.name, f.kind, f.help[:500], points))  # type: ignore[arg-type]
    return out


#: what the kernel takes of one HSU's Core.Metrics
MAX_FAMILIES = 500
MAX_POINTS = 2000
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")
