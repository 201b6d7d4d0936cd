"""Metrics: counters, gauges and histograms with labels, and the port
exporters read them through.

A :class:`Registry` holds metrics that code updates as things happen (a
routed call's count and latency) and *collectors*, functions called when an
exporter collects, that read values which already exist somewhere (the
kernel's instances, their states and restarts) instead of having them
pushed on every change. :meth:`Registry.collect` returns both as plain
:class:`Family` records; an exporter (``hsu_register_exporters``) renders
them in its own format (Prometheus text, InfluxDB line protocol, ...).

The kernel has one registry (``kernel.metrics``); a process that is no
kernel (an HSU, a client using ``hsu.connect``) uses :data:`REGISTRY`.
Nothing here imports an exporter's library: importing this module costs a
few microseconds.

Routed calls are counted with go-grpc-prometheus's names
(:class:`CallMetrics`), so the dashboards made for Go servers work.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs
import grpc

from hsu.ports import Exporter

__all__ = [
    "DEFAULT_BUCKETS",
    "GRPC_TYPES",
    "REGISTRY",
    "CallMetrics",
    "CallStatus",
    "Collector",
    "Counter",
    "Exporter",
    "Family",
    "Gauge",
    "Histogram",
    "Kind",
    "Point",
    "Registry",
    "client_observer",
    "code_of",
    "enabled",
    "method_kind",
    "served_status",
]

Kind = Literal["counter", "gauge", "histogram"]

#: seconds; go-grpc-prometheus's (Prometheus's default) buckets
DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: a metric name and a label name: Prometheus's grammar
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")
#: label sets one metric may have: past this, a new one is dropped (counted
#: in ``hsu_metrics_dropped_series_total``), not kept growing without bound
MAX_SERIES: Final = 10_000


def enabled() -> bool:
    """Counting routed calls is on unless ``HSU_METRICS`` is ``0``/``false``/``no``
    (a deployment turns the kernel's off with ``kernel.metrics: false``)."""
    return os.environ.get("HSU_METRICS", "1").strip().lower() not in ("0", "false", "no", "off")


def _check_name(name: str, what: str) -> str:
    if not name or name[0].isdigit() or not set(name) <= _NAME_CHARS or name.startswith("__"):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '_' (not first a digit)")
    return name


@attrs.frozen
class Point:
    """One labelled series of a metric, as collected."""

    #: (name, value) pairs, in the metric's label order
    labels: tuple[tuple[str, str], ...]
    #: a counter's or gauge's value; a histogram's sum
    value: float = 0.0
    #: a histogram's cumulative counts: (upper bound, count), the last +Inf
    buckets: tuple[tuple[float, int], ...] = ()
    #: a histogram's number of observations
    count: int = 0


@attrs.frozen
class Family:
    """One metric with all its series, as collected."""

    name: str
    kind: Kind
    help: str
    points: tuple[Point, ...]

    def with_labels(self, extra: Mapping[str, str]) -> Family:
        """The same, each point with ``extra`` labels added in front (a
        point's own label of the same name wins)."""
        add = tuple(extra.items())
        pts = []
        for p in self.points:
            own = {k for k, _ in p.labels}
            pts.append(
                attrs.evolve(p, labels=tuple(kv for kv in add if kv[0] not in own) + p.labels)
            )
        return attrs.evolve(self, points=tuple(pts))


#: called at collection time: returns the families it reads right then
Collector = Callable[[], Iterable[Family]]


class _Metric:
    kind: Kind

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str]):
        self.name = _check_name(name, "metric name")
        self.help = help
        self.label_names = tuple(_check_name(n, "label name") for n in labels)
        self._registry = registry
        self._lock = threading.Lock()

    def _key(self, values: Sequence[str], kw: Mapping[str, str]) -> tuple[str, ...]:
        if kw:
            if values:
                raise TypeError(f"{self.name}: labels by position or by name, not both")
            try:
                values = tuple(str(kw[n]) for n in self.label_names)
            except KeyError as exc:
                raise TypeError(f"{self.name}: missing label {exc.args[0]!r}") from None
            if len(kw) != len(self.label_names):
                extra = sorted(set(kw) - set(self.label_names))
                raise TypeError(f"{self.name}: unknown label(s) {', '.join(extra)}")
        if len(values) != len(self.label_names):
            raise TypeError(
                f"{self.name}: expected labels {list(self.label_names)}, got {list(values)}"
            )
        return tuple(str(v) for v in values)


class Counter(_Metric):
    """A value that only goes up. ``counter.labels("a", "b").inc()`` or,
    without labels, ``counter.inc()``."""

    kind: Kind = "counter"

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(registry, name, help, labels)
        self._values: dict[tuple[str, ...], list[float]] = {}

    def labels(self, *values: str, **kw: str) -> _CounterChild:
        key = self._key(values, kw)
        cell = self._values.get(key)
        if cell is None:
            with self._lock:
                cell = self._values.get(key)
                if cell is None:
                    if len(self._values) >= MAX_SERIES:
                        self._registry.dropped_series += 1
                        return _CounterChild([0.0], self._lock)
                    cell = self._values[key] = [0.0]
        return _CounterChild(cell, self._lock)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def collect(self) -> Family:
        with self._lock:
            items = [(k, v[0]) for k, v in self._values.items()]
        names = self.label_names
        pts = tuple(Point(tuple(zip(names, k, strict=True)), v) for k, v in items)
        return Family(self.name, "counter", self.help, pts)


class _CounterChild:
    __slots__ = ("_cell", "_lock")

    def __init__(self, cell: list[float], lock: threading.Lock):
        self._cell = cell
        self._lock = lock

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self._cell[0] += amount


class Gauge(_Metric):
    """A value that goes up and down: ``set``, ``inc``, ``dec``."""

    kind: Kind = "gauge"

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(registry, name, help, labels)
        self._values: dict[tuple[str, ...], list[float]] = {}

    def labels(self, *values: str, **kw: str) -> _GaugeChild:
        key = self._key(values, kw)
        with self._lock:
            cell = self._values.get(key)
            if cell is None:
                if len(self._values) >= MAX_SERIES:
                    self._registry.dropped_series += 1
                    return _GaugeChild([0.0], self._lock)
                cell = self._values[key] = [0.0]
        return _GaugeChild(cell, self._lock)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().inc(-amount)

    def collect(self) -> Family:
        with self._lock:
            items = [(k, v[0]) for k, v in self._values.items()]
        names = self.label_names
        pts = tuple(Point(tuple(zip(names, k, strict=True)), v) for k, v in items)
        return Family(self.name, "gauge", self.help, pts)


class _GaugeChild:
    __slots__ = ("_cell", "_lock")

    def __init__(self, cell: list[float], lock: threading.Lock):
        self._cell = cell
        self._lock = lock

    def set(self, value: float) -> None:
        self._cell[0] = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._cell[0] += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class _HistogramCell:
    """One series: counts per bucket (not cumulative; +Inf last), sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, n: int):
        self.counts = [0] * (n + 1)
        self.sum = 0.0


class Histogram(_Metric):
    """Observations counted into buckets (upper bounds, in seconds for
    latencies), with their sum and count."""

    kind: Kind = "histogram"

    def __init__(
        self,
        registry: Registry,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ):
        super().__init__(registry, name, help, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {buckets!r}")
        self.buckets = tuple(bounds)
        self._values: dict[tuple[str, ...], _HistogramCell] = {}

    def labels(self, *values: str, **kw: str) -> _HistogramChild:
        key = self._key(values, kw)
        cell = self._cell(key)
        return _HistogramChild(self.buckets, cell, self._lock)

    def _cell(self, key: tuple[str, ...]) -> _HistogramCell:
        cell = self._values.get(key)
        if cell is None:
            with self._lock:
                cell = self._values.get(key)
                if cell is None:
                    if len(self._values) >= MAX_SERIES:
                        self._registry.dropped_series += 1
                        return _HistogramCell(len(self.buckets))
                    cell = self._values[key] = _HistogramCell(len(self.buckets))
        return cell

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Family:
        with self._lock:
            items = [(k, list(c.counts), c.sum) for k, c in self._values.items()]
        names = self.label_names
        bounds = (*self.buckets, math.inf)
        pts = []
        for k, counts, total in items:
            running = 0
            cumulative = []
            for b, n in zip(bounds, counts, strict=True):
                running += n
                cumulative.append((b, running))
            labels = tuple(zip(names, k, strict=True))
            pts.append(Point(labels, total, tuple(cumulative), running))
        return Family(self.name, "histogram", self.help, tuple(pts))


class _HistogramChild:
    __slots__ = ("_bounds", "_cell", "_lock")

    def __init__(self, bounds: tuple[float, ...], cell: _HistogramCell, lock: threading.Lock):
        self._bounds = bounds
        self._cell = cell
        self._lock = lock

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bounds, value)
        cell = self._cell
        with self._lock:
            cell.counts[i] += 1
            cell.sum += value


@attrs.frozen
class _Source:
    """A :meth:`Registry.add_source` registration."""

    name: str
    source: Callable[..., Awaitable[list[Family]]]
    families: frozenset[str] | None
    filtered: bool


class Registry:
    """Metrics by name, and collectors; see the module docstring."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[tuple[str, Callable[..., Iterable[Family]], bool]] = []
        self._sources: list[_Source] = []
        self._lock = threading.Lock()
        #: label sets refused because a metric had :data:`MAX_SERIES` already
        self.dropped_series = 0

    def _get(self, cls: type[Any], name: str, help: str, labels: Sequence[str], **kw: Any) -> Any:
        with self._lock:
            known = self._metrics.get(name)
            if known is not None:
                if type(known) is not cls or known.label_names != tuple(labels):
                    raise ValueError(
                        f"metric {name!r} exists as a {known.kind} with labels"
                        f" {list(known.label_names)}"
                    )
                return known
            metric = self._metrics[name] = cls(self, name, help, labels, **kw)
            return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """The counter ``name`` (made on first use; the same object after)."""
        metric: Counter = self._get(Counter, name, help, labels)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        metric: Gauge = self._get(Gauge, name, help, labels)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        metric: Histogram = self._get(Histogram, name, help, labels, buckets=buckets)
        return metric

    def add_collector(
        self,
        name: str,
        collector: Callable[..., Iterable[Family]],
        *,
        filtered: bool = False,
    ) -> None:
        """Call ``collector()`` at every collection; ``name`` says whose it
        is in an error (a collector that raises is logged and skipped).
        ``filtered``: it is called as ``collector(names)`` with the names a
        collection asks for (``None``: every family) and may make only those."""
        with self._lock:
            self._collectors.append((name, collector, filtered))

    def add_source(
        self,
        name: str,
        source: Callable[..., Awaitable[list[Family]]],
        *,
        families: Collection[str] | None = None,
        filtered: bool = False,
    ) -> None:
        """Await ``source()`` at every :meth:`gather` (values another process
        holds: the kernel's HSUs over Core.Metrics); it should bound its own time.

        :param families: the names of the families it answers, when they are
            known: a gather of only other names does not await it.
        :param filtered: it is called as ``source(names)`` with the names a
            gather asks for (``None``: every family) and may answer only those.
        """
        known = None if families is None else frozenset(families)
        with self._lock:
            self._sources.append(_Source(name, source, known, filtered))

    async def gather(
        self, names: Collection[str] | None = None, *, skip: Collection[str] = ()
    ) -> list[Family]:
        """:meth:`collect` plus every source's families, one family per name
        (series of the same name from several sources are merged; one whose
        kind differs from the first is left out). What exporters call.

        ``names``: only the families of these names (Core.Metrics's
        ``families``); a source whose ``families`` are none of them is not
        awaited. ``None``: every family. ``skip``: the sources of these
        names are not awaited (Core.Metrics's ``local``: not the HSUs')."""
        import asyncio

        wanted = None if names is None else frozenset(names)
        with self._lock:
            sources = [
                s
                for s in self._sources
                if (wanted is None or s.families is None or s.families & wanted)
                and s.name not in skip
            ]
        pending = asyncio.gather(
            *(s.source(wanted) if s.filtered else s.source() for s in sources),
            return_exceptions=True,
        )
        try:
            if sources:
                await asyncio.sleep(0)  # the sources start (a sampling thread)...
            merged: dict[str, Family] = {f.name: f for f in self.collect(wanted)}  # ...meanwhile
        except BaseException:
            pending.cancel()
            raise
        results = await pending
        for s, result in zip(sources, results, strict=True):
            if isinstance(result, BaseException):
                from loguru import logger

                logger.warning("metrics source {} failed: {!r}", s.name, result)
                continue
            for fam in result:
                if wanted is not None and fam.name not in wanted:
                    continue
                known = merged.get(fam.name)
                if known is None:
                    merged[fam.name] = fam
                elif known.kind == fam.kind:
                    merged[fam.name] = attrs.evolve(known, points=known.points + fam.points)
        return list(merged.values())

    def remove_collector(self, name: str) -> None:
        with self._lock:
            self._collectors = [c for c in self._collectors if c[0] != name]

    def collect(self, names: Collection[str] | None = None) -> list[Family]:
        """Every metric's and collector's families, read now (``names``: only
        the families of these names)."""
        with self._lock:
            metrics = [m for m in self._metrics.values() if names is None or m.name in names]
            collectors = list(self._collectors)
        out: list[Family] = [m.collect() for m in metrics]  # type: ignore[attr-defined]
        wanted = None if names is None else frozenset(names)
        for name, collector, filtered in collectors:
            try:
                made = collector(wanted) if filtered else collector()
                out.extend(f for f in made if wanted is None or f.name in wanted)
            except Exception as exc:  # one broken collector does not break the scrape
                from loguru import logger

                logger.opt(exception=exc).warning("metrics collector {} failed: {!r}", name, exc)
        dropped = "hsu_metrics_dropped_series_total"
        if self.dropped_series and (names is None or dropped in names):
            out.append(
                Family(
                    dropped,
                    "counter",
                    f"label sets refused: a metric had {MAX_SERIES} already",
                    (Point((), float(self.dropped_series)),),
                )
            )
        return out


#: the registry of a process that is no kernel (an HSU, a ``hsu.connect`` client)
REGISTRY: Final = Registry()


# -- routed calls -------------------------------------------------------------------

#: grpc's kind of method, as go-grpc-prometheus's ``grpc_type`` says it
GRPC_TYPES: Final[Mapping[str, str]] = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


def method_kind(request_streaming: bool, response_streaming: bool) -> str:
    """grpc's name of a method's kind (``unary_unary``, ``unary_stream``,
    ``stream_unary``, ``stream_stream``) from its descriptor's
    ``client_streaming`` and ``server_streaming``; :data:`GRPC_TYPES` gives
    go-grpc-prometheus's name of it."""
    request = "stream" if request_streaming else "unary"
    return f"{request}_{'stream' if response_streaming else 'unary'}"


def code_of(exc: BaseException | None) -> str:
    """The status code name a call ended with (``OK`` for none, ``CANCELLED``
    for a cancellation, ``UNKNOWN`` for anything else)."""
    if exc is None:
        return "OK"
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            value = code()
        except Exception:  # an RpcError that is no call: grpc's own
            value = None
        if isinstance(value, grpc.StatusCode):
            return str(value.name)
    if isinstance(exc, (GeneratorExit, KeyboardInterrupt)) or type(exc).__name__ in (
        "CancelledError",
    ):
        return "CANCELLED"
    return "UNKNOWN"


class CallStatus(Exception):
    """A served call's end as :func:`code_of` reads it: its status code and
    details, for a call whose handler raised no exception carrying them
    (``context.abort`` raises a bare one, and a handler may set the code on
    its context and return)."""

    def __init__(self, code: grpc.StatusCode, details: str = ""):
        super().__init__(details or code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def served_status(context: Any, exc: BaseException | None = None) -> BaseException | None:
    """What an observer of a served call records as its end: a
    :class:`CallStatus` when the call's ``context`` holds a status code other
    than OK (set by ``context.abort`` or ``context.set_code``), else ``exc``
    (``None`` for a call that returned)."""
    code_fn = getattr(context, "code", None)
    code = code_fn() if callable(code_fn) else None
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        details_fn = getattr(context, "details", None)
        details = details_fn() if callable(details_fn) else None
        return CallStatus(code, details if isinstance(details, str) else "")
    return exc


class CallMetrics:
    """A side's routed or served calls, with go-grpc-prometheus's names:
    ``grpc_{side}_handled_total`` (a counter) and
    ``grpc_{side}_handling_seconds`` (a histogram), labelled ``grpc_type``,
    ``grpc_service``, ``grpc_method``, ``grpc_code`` and ``hsu_unit`` (the
    unit the call went to; "" when none took it). ``side`` is ``server`` for
    the kernel's gateway and an HSU, ``client`` for ``hsu.connect``."""

    LABELS: Final = ("grpc_type", "grpc_service", "grpc_method", "grpc_code", "hsu_unit")

    def __init__(self, registry: Registry, side: Literal["server", "client"] = "server"):
        self.handled = registry.counter(
            f"grpc_{side}_handled_total",
            f"RPCs completed on the {side}, whatever their status",
            self.LABELS,
        )
        self.seconds = registry.histogram(
            f"grpc_{side}_handling_seconds",
            f"seconds from the start of an RPC to its end, on the {side}",
            self.LABELS,
        )
        #: the histogram's: a collection copies its counts and sum together
        self._lock = self.seconds._lock
        #: the two series of a label set, made once
        self._children: dict[
            tuple[str, str, str, str], tuple[list[float], _HistogramCell, tuple[float, ...]]
        ] = {}

    def observe(
        self, kind: str, method: str, unit: str, exc: BaseException | None, t0: float
    ) -> None:
        """A call of ``method`` (``/pkg.Service/Method``) of grpc ``kind``
        (``unary_unary``...) ended, begun at ``t0`` (:func:`time.perf_counter`)."""
        self.count(kind, method, unit, code_of(exc), time.perf_counter() - t0)

    def count(self, kind: str, method: str, unit: str, code: str, seconds: float) -> None:
        """A call of ``method`` that ended with status ``code`` (its name:
        ``OK``...) after ``seconds``: what :meth:`observe` counts, for a call
        timed elsewhere (the nginx data plane's access log)."""
        key = (kind, method, unit, code)
        made = self._children.get(key)
        if made is None:
            made = self._made(key)
        cell, hist, bounds = made
        i = bisect.bisect_left(bounds, seconds)
        with self._lock:
            cell[0] += 1
            hist.counts[i] += 1
            hist.sum += seconds

    def _made(
        self, key: tuple[str, str, str, str]
    ) -> tuple[list[float], _HistogramCell, tuple[float, ...]]:
        kind, method, unit, code = key
        service, _, name = method.lstrip("/").partition("/")
        labels = (GRPC_TYPES.get(kind, kind), service, name, code, unit)
        counter = self.handled.labels(*labels)
        made = (counter._cell, self.seconds._cell(labels), self.seconds.buckets)
        if len(self._children) < MAX_SERIES:
            self._children[key] = made
        return made


_client: CallMetrics | None = None


def client_observer() -> Callable[[str, str, str, BaseException | None, float], None] | None:
    """What ``hsu.connect`` and ``hsu.connect_sync`` count their calls with:
    ``grpc_client_*`` in :data:`REGISTRY` (``None`` with ``HSU_METRICS=0``)."""
    global _client
    if not enabled():
        return None
    if _client is None:
        _client = CallMetrics(REGISTRY, "client")
    return _client.observe
