"""The ``prometheus`` exporter: ``GET /metrics`` in Prometheus's text format.

Started by ``kernel.exporters: [prometheus]``; its section:

.. code-block:: yaml

    prometheus:
      address: 127.0.0.1:9464   # loopback by default
      path: /metrics

The page holds the kernel's metrics (``kernel.metrics``: routed calls under
go-grpc-prometheus's names, instances by unit and state, restarts, breakers,
RSS and CPU, and what HSUs report over Core), plus the kernel process's own
(``process_*``, ``python_gc_*``, ``python_info``) from prometheus-client.

The server runs on the kernel's event loop (``asyncio.start_server``), so a
collection reads the kernel's state between two of its steps, never while
one runs. prometheus-client is the extra ``hsu[prometheus]``, imported only
when the exporter starts: a kernel that does not use it starts no slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
from collections.abc import Callable, Iterator
from typing import Any

import attrs

import hsu
from hsu.errors import PluginError
from hsu.metrics import Family
from hsu.ports import KernelAPI

SECTION = "prometheus"
#: a request's head is read within this time and size, or the connection is closed
HEAD_TIMEOUT = 5.0
HEAD_MAX = 8192


def _address(_inst: Any, _attr: Any, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"prometheus.address: {value!r} is not host:port")


@attrs.frozen
class PrometheusSettings:
    """The ``prometheus`` section."""

    #: where ``/metrics`` listens: ``host:port`` (port 0: any free one)
    address: str = attrs.field(default="127.0.0.1:9464", validator=_address)
    #: the page's path
    path: str = "/metrics"
    #: listen off loopback (anyone who can reach the port reads the metrics)
    allow_remote: bool = False


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, PrometheusSettings)


@hsu.hookimpl
def hsu_register_exporters(register: Callable[..., None]) -> None:
    register("prometheus", PrometheusExporter)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PrometheusExporter:
    """See the module docstring. ``address`` is where it listens, once it does."""

    def __init__(self, kernel: KernelAPI):
        self.settings: PrometheusSettings = kernel.settings(SECTION)
        self._kernel = kernel
        self._server: asyncio.Server | None = None
        self._registry: Any = None
        self._bridge = _Bridge()
        self.address = ""

    async def start(self) -> None:
        s = self.settings
        host, port = _split(s.address)
        if not _loopback(host) and not s.allow_remote:
            raise PluginError(
                f"prometheus.address: {s.address} is reachable from other machines;"
                " set prometheus.allow_remote: true to serve the metrics there"
            )
        try:
            import prometheus_client
            from prometheus_client import (
                GCCollector,
                PlatformCollector,
                ProcessCollector,
            )
        except ImportError as exc:
            raise PluginError(
                "kernel.exporters: prometheus needs prometheus-client:"
                " pip install 'hsu[prometheus]'"
            ) from exc
        registry = prometheus_client.CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._bridge = _Bridge()
        registry.register(self._bridge)
        self._registry = registry
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise PluginError(f"prometheus.address: cannot listen on {s.address}: {exc}") from exc
        bound = self._server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.address = f"{shown}:{bound[1]}"
        from loguru import logger

        logger.info("prometheus exporter: http://{}{}", self.address, s.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def render(self) -> bytes:
        """The page, as a scrape gets it."""
        from prometheus_client import generate_latest

        self._bridge.families = await self._kernel.metrics.gather()
        try:
            page: bytes = generate_latest(self._registry)
        finally:
            self._bridge.families = []
        return page

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                return
            if len(head) > HEAD_MAX:
                await _reply(writer, 431, b"request head too large\n")
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await _reply(writer, 400, b"bad request\n")
                return
            method, target, _ = parts
            path = target.partition("?")[0]
            if path != self.settings.path:
                await _reply(writer, 404, f"not found; try {self.settings.path}\n".encode())
                return
            if method not in ("GET", "HEAD"):
                await _reply(writer, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
                return
            from prometheus_client import CONTENT_TYPE_LATEST

            page = await self.render()
            await _reply(writer, 200, page, CONTENT_TYPE_LATEST, head_only=method == "HEAD")
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}  # fmt: skip


async def _reply(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    extra: bytes = b"",
    head_only: bool = False,
) -> None:
    writer.write(
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + (b"" if head_only else body)
    )
    await writer.drain()


class _Bridge:
    """hsu's families as prometheus-client's metrics (a custom collector)."""

    def __init__(self) -> None:
        #: what the scrape being answered gathered
        self.families: list[Family] = []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import Metric
        from prometheus_client.utils import floatToGoString

        for fam in self.families:
            yield _metric(Metric, floatToGoString, fam)


def _metric(metric_cls: Any, go: Callable[[float], str], fam: Family) -> Any:
    if fam.kind == "counter":
        base = fam.name[: -len("_total")] if fam.name.endswith("_total") else fam.name
        m = metric_cls(base, fam.help, "counter")
        for p in fam.points:
            m.add_sample(base + "_total", dict(p.labels), p.value)
        return m
    if fam.kind == "histogram":
        m = metric_cls(fam.name, fam.help, "histogram")
        for p in fam.points:
            labels = dict(p.labels)
            for bound, n in p.buckets:
                le = "+Inf" if math.isinf(bound) else go(bound)
                m.add_sample(fam.name + "_bucket", {**labels, "le": le}, float(n))
            m.add_sample(fam.name + "_count", labels, float(p.count))
            m.add_sample(fam.name + "_sum", labels, p.value)
        return m
    m = metric_cls(fam.name, fam.help, "gauge")
    for p in fam.points:
        m.add_sample(fam.name, dict(p.labels), p.value)
    return m
