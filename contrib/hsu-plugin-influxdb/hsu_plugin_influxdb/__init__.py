"""hsu-plugin-influxdb: the kernel's metrics to InfluxDB 1.x (see README.md).

The exporter collects ``kernel.metrics`` on the kernel's loop every
``interval`` seconds, turns the families into line-protocol lines, appends
them to a bounded buffer and writes the buffer out in batches from a thread
(``asyncio.to_thread``): a slow or absent server costs the kernel nothing but
the buffer, whose overflow is dropped and counted.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ipaddress
import math
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from loguru import logger

import hsu
from hsu.errors import PluginError
from hsu.metrics import Family
from hsu.ports import KernelAPI

SECTION = "influxdb"


def _url(_inst: Any, _attr: Any, value: str) -> None:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"influxdb.url: {value!r} is not an http(s):// URL")


@attrs.frozen
class InfluxSettings:
    """The ``influxdb`` section."""

    url: str = attrs.field(default="http://127.0.0.1:8086", validator=_url)
    database: str = "hsu"
    interval: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    batch_lines: int = attrs.field(default=5000, validator=attrs.validators.ge(1))
    max_lines: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    tags: dict[str, str] = attrs.field(factory=dict)
    #: environment variables holding the user and password (never the file)
    username_env: str = ""
    password_env: str = ""
    #: write to a server off loopback over plain http (credentials in clear)
    allow_remote: bool = False


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, InfluxSettings)


@hsu.hookimpl
def hsu_register_exporters(register: Callable[..., None]) -> None:
    register("influxdb", InfluxExporter)


# -- line protocol --------------------------------------------------------------------


def _escape_key(s: str) -> str:
    """A measurement, tag key, tag value or field key."""
    return s.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ").replace("=", "\\=")


def _number(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return ""
    return repr(float(v))


def lines(families: Iterable[Family], timestamp_ns: int, tags: dict[str, str]) -> list[str]:
    """``families`` in InfluxDB's line protocol, one line per labelled series."""
    out: list[str] = []
    extra = "".join(f",{_escape_key(k)}={_escape_key(v)}" for k, v in sorted(tags.items()))
    for fam in families:
        measurement = _escape_key(fam.name)
        for p in fam.points:
            own = "".join(
                f",{_escape_key(k)}={_escape_key(v)}" for k, v in sorted(p.labels) if v != ""
            )
            if fam.kind == "histogram":
                fields = [f"count={p.count}i", f"sum={_number(p.value) or 0.0}"]
                for bound, n in p.buckets:
                    name = "+Inf" if math.isinf(bound) else repr(bound)
                    fields.append(f"{_escape_key(name)}={n}i")
                field_text = ",".join(fields)
            else:
                value = _number(p.value)
                if not value:
                    continue
                field_text = f"value={value}"
            out.append(f"{measurement}{extra}{own} {field_text} {timestamp_ns}")
    return out


# -- the exporter ---------------------------------------------------------------------


class InfluxExporter:
    """See the module docstring."""

    def __init__(self, kernel: KernelAPI):
        self.settings: InfluxSettings = kernel.settings(SECTION)
        self._kernel = kernel
        s = self.settings
        parts = urllib.parse.urlsplit(s.url)
        host = parts.hostname or ""
        if not _loopback(host) and not s.allow_remote:
            raise PluginError(
                f"influxdb.url: {s.url} is off this machine; set influxdb.allow_remote: true"
                " to send the metrics there"
            )
        self._parts = parts
        self._buffer: collections.deque[str] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        m = kernel.metrics
        self.dropped = m.counter(
            "hsu_influxdb_dropped_lines_total",
            "lines dropped because the buffer was full while InfluxDB could not be written",
        )
        self.written = m.counter("hsu_influxdb_written_lines_total", "lines InfluxDB accepted")
        self.failures = m.counter("hsu_influxdb_write_failures_total", "writes that failed")
        buffered = m.gauge("hsu_influxdb_buffered_lines", "lines waiting to be written")
        self._buffered = buffered
        self.dropped_count = 0

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # one last collection and write, bounded by the timeout
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._last(), self.settings.timeout + 3)

    async def _last(self) -> None:
        await self.collect_once()
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self.collect_once()
            await self.flush()
            await asyncio.sleep(self.settings.interval)

    async def collect_once(self) -> None:
        """Collect now (on the kernel's loop) into the buffer."""
        families = await self._kernel.metrics.gather()
        new = lines(families, time.time_ns(), self.settings.tags)
        self._buffer.extend(new)
        over = len(self._buffer) - self.settings.max_lines
        if over > 0:
            for _ in range(over):
                self._buffer.popleft()
            self.dropped.inc(over)
            self.dropped_count += over
        self._buffered.set(len(self._buffer))

    async def flush(self) -> None:
        """Write the buffer out in batches; on a failure keep what is left."""
        import http.client  # here: a kernel that exports nowhere does not load it

        s = self.settings
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(s.batch_lines, len(self._buffer)))]
            try:
                await asyncio.to_thread(self._post, "\n".join(batch).encode() + b"\n")
            except (OSError, http.client.HTTPException, WriteError) as exc:
                self.failures.inc()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    logger.warning(
                        "influxdb: cannot write to {}: {} (keeping up to {} lines)",
                        s.url,
                        exc,
                        s.max_lines,
                    )
                break
            for _ in batch:
                self._buffer.popleft()
            self.written.inc(len(batch))
            if self._down_since is not None:
                logger.info(
                    "influxdb: writing to {} again after {:.0f}s",
                    s.url,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
        self._buffered.set(len(self._buffer))

    def _post(self, body: bytes) -> None:
        import http.client

        s = self.settings
        parts = self._parts
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port, timeout=s.timeout)
        query = urllib.parse.urlencode({"db": s.database, "precision": "ns"})
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        user = os.environ.get(s.username_env, "") if s.username_env else ""
        if user:
            password = os.environ.get(s.password_env, "") if s.password_env else ""
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            conn.request("POST", f"{parts.path.rstrip('/')}/write?{query}", body, headers)
            reply = conn.getresponse()
            text = reply.read(2048).decode("utf-8", "replace").strip()
            if reply.status != 204:
                raise WriteError(f"HTTP {reply.status}: {text[:200]}")
        finally:
            conn.close()


class WriteError(Exception):
    """InfluxDB refused a write."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
