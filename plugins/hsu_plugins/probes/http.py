"""The ``http`` probe: ``GET`` over HTTP/1.1, healthy iff the status is 200-399."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import attrs

from hsu.ports import ProbeResult, ProbeTarget
from hsu_plugins.probes._common import (
    DEFAULT_HOST,
    QUOTE_CHARS,
    close,
    connect_error,
    quote,
    timed_out,
)
from hsu_plugins.probes.tcp import PORT


def _url(inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        if inst.port is None:
            raise ValueError("'url' required (or port, with an optional path)")
        return
    url = urllib.parse.urlsplit(value)
    if url.scheme != "http":
        raise ValueError(f"'url' only http:// URLs are supported, got {value!r}")
    if not url.hostname:
        raise ValueError(f"'url' no host in {value!r}")
    try:
        url.port  # noqa: B018 - raises for a bad port
    except ValueError:
        raise ValueError(f"'url' bad port in {value!r}") from None


def _path(_: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value.startswith("/"):
        raise ValueError(f"'path' must be a path starting with '/', got {value!r}")


def _not_with_url(inst: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and inst.url is not None:
        raise ValueError(f"'{attribute.name}' give either url, or port and path, not both")


@attrs.frozen
class HttpOptions:
    """``url``, or ``port`` and ``path``: ``http://127.0.0.1:PORT/PATH``."""

    #: an ``http://`` URL (HTTPS is not supported)
    url: str | None = attrs.field(default=None, validator=_url)
    port: int | None = attrs.field(default=None, validator=[PORT, _not_with_url])
    #: with ``port``; none: ``/``
    path: str | None = attrs.field(default=None, validator=[_path, _not_with_url])


class HttpProbe:
    """``GET`` over HTTP/1.1 with ``Connection: close``: healthy iff 200-399."""

    options = HttpOptions

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        options: HttpOptions = target.options
        if options.url is not None:
            url = options.url
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname or "", parts.port or 80
            path = parts.path or "/"
            if parts.query:
                path = f"{path}?{parts.query}"
        else:
            host, port = DEFAULT_HOST, options.port or 80
            path = options.path or "/"
            url = f"http://{host}:{port}{path}"
        where = f"http GET {url}"
        try:
            async with asyncio.timeout(timeout):
                status, reason = await self._get(host, port, path)
        except TimeoutError:
            return ProbeResult(False, f"{where}: {timed_out(timeout)}")
        except OSError as exc:
            return ProbeResult(False, f"{where}: {connect_error(exc)}")
        except ValueError as exc:
            return ProbeResult(False, f"{where}: {exc}")
        detail = f"{where}: {status} {reason}".rstrip()
        return ProbeResult(200 <= status < 400, detail)

    @staticmethod
    async def _get(host: str, port: int, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            name = f"[{host}]" if ":" in host else host
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {name}:{port}\r\nUser-Agent: hsu-probe\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("latin-1"))
            await writer.drain()
            line = await reader.readline()
        except BaseException:
            writer.transport.abort()
            raise
        await close(writer)
        if not line:
            raise ValueError("the connection closed before a response")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {quote(line[:QUOTE_CHARS])}")
        return int(parts[1]), parts[2] if len(parts) > 2 else ""
