"""What several probes share: quoting, and the wording of common failures."""

from __future__ import annotations

import asyncio
import contextlib

DEFAULT_HOST = "127.0.0.1"
#: the longest output line, server reply or command quoted in a detail
QUOTE_CHARS = 200


def cut(text: str) -> str:
    """``text``, cut to :data:`QUOTE_CHARS` (a detail stays one readable line)."""
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def quote(value: object) -> str:
    """``repr(value)``, cut to :data:`QUOTE_CHARS`."""
    return cut(repr(value))


def timed_out(timeout: float) -> str:
    return f"timed out after {timeout:g}s"


def connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` (also ``[v6]:port``, ``ipv4:``/``dns:`` forms) or None."""
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
            break
    if not address or address.startswith("unix"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
