"""The kernel's answer to nginx's ``auth_request`` subrequests (auth on).

With auth on, nginx asks before it forwards a call to an instance: a
subrequest carrying the call's headers (its metadata), its path (the full
method) and the client's address, answered here by
:meth:`hsu.ports.KernelAPI.check_call` — the authenticators and authorizers
the kernel's own gateway uses, with the same caches. ``204`` lets the call
through; ``401`` and ``403`` stop it, with the reason in ``X-Hsu-Reason``
(percent-encoded as a ``grpc-message``), which nginx.conf turns into a
``UNAUTHENTICATED`` or ``PERMISSION_DENIED`` gRPC status; ``500`` (an auth
plugin failed) into ``UNAVAILABLE``.

HTTP/1.1 on a unix socket in nginx's 0700 directory (loopback TCP when the
kernel runs as root, whose workers cannot enter it), kept alive by nginx; one
request head at most :data:`MAX_HEAD` bytes, no body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
from pathlib import Path

from loguru import logger

from hsu.errors import HsuError, PermissionDenied, Unauthenticated
from hsu.ports import KernelAPI

#: the longest request head read (nginx passes the call's metadata; gRPC's
#: own default limit on metadata is 8 KiB, grpcio's 16 KiB)
MAX_HEAD = 64 * 1024
#: headers that are HTTP's or nginx's, not the call's metadata
NOT_METADATA = frozenset(
    {"host", "connection", "content-length", "content-type", "te", "user-agent",
     "x-hsu-method", "x-hsu-peer", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
)  # fmt: skip
#: seconds an idle keep-alive connection from nginx is kept
IDLE = 60.0


def grpc_message(text: str) -> str:
    """``text`` percent-encoded as gRPC's ``grpc-message`` wants it (and fit
    for an HTTP header): printable ASCII but ``%`` as is, every other byte
    ``%XX``."""
    out = []
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _peer(value: str) -> str:
    """nginx's ``$remote_addr:$remote_port`` as gRPC names a peer."""
    host, _, port = value.rpartition(":")
    if host.startswith("unix:") or value.startswith("unix:"):
        return "unix:"
    if ":" in host:
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"


def _metadata(lines: list[bytes]) -> tuple[str, str, tuple[tuple[str, str | bytes], ...]]:
    """(method, peer, metadata) from a request's header lines."""
    method = peer = ""
    metadata: list[tuple[str, str | bytes]] = []
    for line in lines:
        name, sep, raw = line.partition(b":")
        if not sep:
            raise ValueError("a header line without ':'")
        key = name.strip().lower().decode("ascii")
        value = raw.strip().decode("latin-1")
        if key == "x-hsu-method":
            method = value
        elif key == "x-hsu-peer":
            peer = _peer(value)
        elif key in NOT_METADATA or key.startswith(":"):
            continue
        elif key.endswith("-bin"):
            try:
                metadata.append(
                    (key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True))
                )
            except (binascii.Error, ValueError):
                raise ValueError(f"header {key!r}: not base64") from None
        else:
            metadata.append((key, value))
    if not method.startswith("/") or method.count("/") != 2:
        raise ValueError(f"X-Hsu-Method {method!r} is not a gRPC method path")
    return method.partition("?")[0], peer, tuple(metadata)


class AuthEndpoint:
    """The HTTP/1.1 server nginx's ``auth_request`` subrequests go to."""

    def __init__(self, kernel: KernelAPI, directory: Path, *, tcp: bool):
        self.kernel = kernel
        self.path = directory / "auth.sock"
        self.tcp = tcp
        self.server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        """Listen; the address as an nginx upstream ``server`` names it."""
        if self.tcp:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD)
            host, port = self.server.sockets[0].getsockname()[:2]
            return f"{host}:{port}"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, str(self.path), limit=MAX_HEAD)
        os.chmod(self.path, 0o600)
        return f"unix:{self.path}"

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for writer in list(self._conns):
            writer.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()
        self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, "request head over 64 KiB", close=True))
                    return
                status, reason = self._answer(head)
                writer.write(_response(status, reason))
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._conns.discard(writer)
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, str]:
        lines = head.split(b"\r\n")
        try:
            method, peer, metadata = _metadata([line for line in lines[1:] if line])
        except (ValueError, UnicodeDecodeError) as exc:
            logger.warning("gateway_nginx: a malformed auth subrequest: {}", exc)
            return 403, f"hsu gateway_nginx: malformed auth subrequest: {exc}"
        try:
            self.kernel.check_call(method, metadata, peer)
        except Unauthenticated as exc:
            return 401, str(exc)
        except PermissionDenied as exc:
            return 403, str(exc)
        except HsuError as exc:
            return 500, str(exc)
        except Exception as exc:  # fail closed, and say so once in the log
            logger.opt(exception=exc).error("gateway_nginx: the auth check failed")
            return 500, f"{method}: the auth check failed (see the kernel's log)"
        return 204, ""


_REASONS = {204: "No Content", 401: "Unauthorized", 403: "Forbidden", 431: "Too Large",
            500: "Internal Server Error"}  # fmt: skip


def _response(status: int, reason: str, *, close: bool = False) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", "Content-Length: 0"]
    if reason:
        head.append(f"X-Hsu-Reason: {grpc_message(reason)}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
