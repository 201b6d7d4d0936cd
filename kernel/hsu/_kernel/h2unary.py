"""The CLI's own gRPC client for unary calls to a kernel's unix control socket.

``import grpc`` alone takes several times what the rest of ``hsu ping``
does (it imports asyncio), and python-hyper's ``h2`` more than half of that
(docs/benchmarks.md, "CLI reads without grpcio"). So ``hsu ping``, ``hsu
status`` and the other one-reply commands speak HTTP/2 (RFC 7540) themselves
over a local unix socket, without TLS or a token: prior knowledge, one
connection, one stream a call (sent together, answered in any order), HPACK
(RFC 7541) decoding of whatever the server's encoder sends (dynamic table,
Huffman), flow control both ways, PING answered, GOAWAY and RST_STREAM as
errors. It is a client for the kernel's own gRPC server, not a general one:
what it does not support (server push, compressed messages, more than one
reply message) is an error that says so. Anything else (TCP, TLS, tokens,
streams) goes through grpcio.
"""

from __future__ import annotations

import _socket  # socket's enums cost more than a call to a local kernel
import contextlib
import struct
import time
from collections.abc import Callable, Iterator, Sequence

#: gRPC status codes by number (grpc/doc/statuscodes.md)
CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
#: the frame size every peer accepts (SETTINGS_MAX_FRAME_SIZE's default; this
#: client does not announce more)
FRAME = 16384
#: the window a peer starts with (RFC 7540 6.9.2)
DEFAULT_WINDOW = 65535
#: the receive window this client announces for each stream and the connection
WINDOW = 1 << 20
#: the largest reply accepted (grpcio's client takes 4 MiB by default)
MAX_REPLY = 64 << 20


class RpcError(Exception):
    """A call that failed: ``code`` a gRPC status name, ``details`` its message."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _protocol(what: str) -> RpcError:
    return RpcError("INTERNAL", f"HTTP/2: {what}")


# -- HPACK (RFC 7541) --------------------------------------------------------------------

#: the static table (Appendix A), index 1 first: "name value" entries
_STATIC = (
    ":authority|:method GET|:method POST|:path /|:path /index.html|:scheme http"
    "|:scheme https|:status 200|:status 204|:status 206|:status 304|:status 400"
    "|:status 404|:status 500|accept-charset|accept-encoding gzip, deflate"
    "|accept-language|accept-ranges|accept|access-control-allow-origin|age|allow"
    "|authorization|cache-control|content-disposition|content-encoding"
    "|content-language|content-length|content-location|content-range|content-type"
    "|cookie|date|etag|expect|expires|from|host|if-match|if-modified-since"
    "|if-none-match|if-range|if-unmodified-since|last-modified|link|location"
    "|max-forwards|proxy-authenticate|proxy-authorization|range|referer|refresh"
    "|retry-after|server|set-cookie|strict-transport-security|transfer-encoding"
    "|user-agent|vary|via|www-authenticate"
)
STATIC: tuple[tuple[bytes, bytes], ...] = tuple(
    (name.encode(), value.encode())
    for name, _, value in (entry.partition(" ") for entry in _STATIC.split("|"))
)

#: the Huffman code's length in bits of each symbol, 0-255 and EOS (Appendix B).
#: The code is canonical: shorter codes first, equal lengths in symbol order,
#: so the lengths alone give every code.
HUFFMAN_LENGTHS = bytes(
    (
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28,
        30, 28, 28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8,
        6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5,
        6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13,
        28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24,
        23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22,
        24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26,
        26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27,
        24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24,
        24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
    )
)  # fmt: skip
EOS = 256


def huffman_codes() -> dict[int, int]:
    """Each code with a leading 1 bit (so its length is part of it) -> its symbol."""
    codes = {}
    code = 0
    order = sorted(range(257), key=lambda s: (HUFFMAN_LENGTHS[s], s))
    length = HUFFMAN_LENGTHS[order[0]]
    for symbol in order:
        code <<= HUFFMAN_LENGTHS[symbol] - length
        length = HUFFMAN_LENGTHS[symbol]
        codes[(1 << length) | code] = symbol
        code += 1
    return codes


_codes: dict[int, int] = {}


def huffman_decode(data: bytes) -> bytes:
    """RFC 7541 5.2: the string the Huffman-coded ``data`` holds."""
    if not _codes:
        _codes.update(huffman_codes())
    out = bytearray()
    code, length = 1, 0  # the bits of the symbol being read, after a leading 1
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            symbol = _codes.get(code)
            if symbol is not None:
                if symbol == EOS:
                    raise _protocol("HPACK: EOS in a Huffman-coded string")
                out.append(symbol)
                code, length = 1, 0
            elif length > 30:
                raise _protocol("HPACK: bad Huffman code")
    # the padding: fewer than 8 bits, all ones (the start of EOS)
    if length > 7 or code != (1 << (length + 1)) - 1:
        raise _protocol("HPACK: bad Huffman padding")
    return bytes(out)


def decode_int(data: bytes, at: int, bits: int) -> tuple[int, int]:
    """RFC 7541 5.1: the integer at ``data[at]`` with a ``bits``-bit prefix, and where it ends."""
    mask = (1 << bits) - 1
    if at >= len(data):
        raise _protocol("HPACK: truncated integer")
    value = data[at] & mask
    at += 1
    if value < mask:
        return value, at
    shift = 0
    while True:
        if at >= len(data) or shift > 28:
            raise _protocol("HPACK: truncated or oversized integer")
        byte = data[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def encode_int(value: int, bits: int, first: int = 0) -> bytes:
    """RFC 7541 5.1: ``value`` with a ``bits``-bit prefix, ``first`` the byte's other bits."""
    mask = (1 << bits) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing (this client keeps no
    encoder table, so the server's SETTINGS_HEADER_TABLE_SIZE is moot)."""
    out = bytearray()
    for name, value in headers:
        out.append(0)  # literal without indexing, new name (6.2.2), no Huffman
        for s in (name.encode(), value.encode()):
            out += encode_int(len(s), 7) + s
    return bytes(out)


class Decoder:
    """An HPACK decoder: the static table, the dynamic table (newest first)
    and its size updates, Huffman-coded strings."""

    def __init__(self, max_size: int = 4096):
        #: the most the encoder may use (our SETTINGS_HEADER_TABLE_SIZE)
        self.max_size = max_size
        #: the size the encoder chose (a dynamic table size update)
        self.limit = max_size
        self.table: list[tuple[bytes, bytes]] = []
        self.size = 0

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 1 <= index <= len(STATIC):
            return STATIC[index - 1]
        if 0 < index - len(STATIC) <= len(self.table):
            return self.table[index - len(STATIC) - 1]
        raise _protocol(f"HPACK: no table entry {index}")

    def _evict(self, room: int) -> None:
        while self.table and self.size + room > self.limit:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def _add(self, name: bytes, value: bytes) -> None:
        need = len(name) + len(value) + 32
        self._evict(need)
        if need <= self.limit:  # else the table is left empty (4.4)
            self.table.insert(0, (name, value))
            self.size += need

    def _string(self, data: bytes, at: int) -> tuple[bytes, int]:
        if at >= len(data):
            raise _protocol("HPACK: truncated string")
        huffman = data[at] & 0x80
        length, at = decode_int(data, at, 7)
        if at + length > len(data):
            raise _protocol("HPACK: truncated string")
        raw = bytes(data[at : at + length])
        return (huffman_decode(raw) if huffman else raw), at + length

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The header fields of one complete header block, in order."""
        fields: list[tuple[bytes, bytes]] = []
        at = 0
        while at < len(block):
            byte = block[at]
            if byte & 0x80:  # indexed field (6.1)
                index, at = decode_int(block, at, 7)
                fields.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update (6.3)
                if fields:
                    raise _protocol("HPACK: table size update after a header field")
                size, at = decode_int(block, at, 5)
                if size > self.max_size:
                    raise _protocol(f"HPACK: table size {size} over {self.max_size}")
                self.limit = size
                self._evict(0)
                continue
            # literals: with incremental indexing (6.2.1), without (6.2.2), never indexed (6.2.3)
            indexing = byte & 0xC0 == 0x40
            index, at = decode_int(block, at, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, at = self._string(block, at)
            value, at = self._string(block, at)
            if indexing:
                self._add(name, value)
            fields.append((name, value))
        return fields


# -- HTTP/2 (RFC 7540) ------------------------------------------------------------------

#: RST_STREAM and GOAWAY error codes -> gRPC status (grpc/doc/PROTOCOL-HTTP2.md)
RESET_CODES = {7: "UNAVAILABLE", 8: "CANCELLED", 11: "RESOURCE_EXHAUSTED", 12: "PERMISSION_DENIED"}
#: an HTTP status without grpc-status -> gRPC status (grpc/doc/http-grpc-status-mapping.md)
HTTP_CODES = {
    400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
    429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE",
}  # fmt: skip


class _Stream:
    def __init__(self, method: str, body: bytes, window: int):
        self.method = method
        self.body = memoryview(body)  # what is left to send
        self.window = window  # what the server lets us send
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.trailers: list[tuple[bytes, bytes]] = []
        self.data = bytearray()
        self.unacked = 0  # received since our last WINDOW_UPDATE
        self.closed = False  # END_STREAM or RST_STREAM from the server
        self.error: RpcError | None = None


class Connection:
    """One HTTP/2 connection to a unix socket (``path``; a leading NUL: an
    abstract one), for unary gRPC calls until ``deadline`` (time.monotonic)."""

    def __init__(self, path: str, deadline: float | None, window: int = WINDOW):
        self.deadline = deadline
        self.window = window
        self.decoder = Decoder()
        self.buffer = bytearray()
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.send_window = DEFAULT_WINDOW
        self.peer_initial = DEFAULT_WINDOW
        self.peer_frame = FRAME
        self.peer_streams = 1 << 31
        self.unacked = 0
        self.last_stream: int | None = None  # GOAWAY's last stream id
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            with self._io(f"{path}: "):
                self.sock.connect(path)
            # no push, our windows, and the connection's window grown to ours
            settings = struct.pack(">HIHI", 2, 0, 4, window)
            grow = window - DEFAULT_WINDOW
            self._send(
                PREFACE
                + self._frame(SETTINGS, 0, 0, settings)
                + (self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", grow)) if grow > 0 else b"")
            )
        except RpcError:
            self.sock.close()
            raise

    def close(self) -> None:
        try:
            last = max(self.streams, default=0)
            self.sock.sendall(self._frame(GOAWAY, 0, 0, struct.pack(">II", last, 0)))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls

    def calls(self, calls: Sequence[tuple[str, bytes]], timeout: float | None) -> list[bytes]:
        """Each ``(path, serialized request)``'s serialized reply, in order;
        the calls go out together. RpcError for the first that failed."""
        return self.replies(self.send(calls, timeout))

    def send(self, calls: Sequence[tuple[str, bytes]], timeout: float | None) -> list[int]:
        """Start each ``(path, serialized request)``: their stream ids."""
        return [self._start(method, request, timeout) for method, request in calls]

    def replies(self, ids: Sequence[int]) -> list[bytes]:
        """The serialized replies of the streams ``ids`` (:meth:`send`), in
        order, once all have ended. RpcError for the first that failed."""
        while not all(self.streams[i].closed for i in ids):
            self._read_frame()
        return [self._reply(self.streams[i]) for i in ids]

    def _start(self, method: str, request: bytes, timeout: float | None) -> int:
        while sum(not s.closed for s in self.streams.values()) >= self.peer_streams:
            self._read_frame()
        if self.last_stream is not None:
            raise RpcError("UNAVAILABLE", "the server is going away (GOAWAY)")
        sid = self.next_id
        self.next_id += 2
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(1, min(int(timeout * 1000), 99999999))}m"))
        block = encode_headers(headers)
        if len(block) > self.peer_frame:
            raise _protocol("request headers larger than one frame")
        body = struct.pack(">BI", 0, len(request)) + request
        stream = self.streams[sid] = _Stream(method, body, self.peer_initial)
        self._send(self._frame(HEADERS, END_HEADERS, sid, block))
        while True:  # DATA as far as the windows let it; wait for more window
            n = min(len(stream.body), self.peer_frame, self.send_window, stream.window)
            if n > 0:
                last = n == len(stream.body)
                self._send(
                    self._frame(DATA, END_STREAM if last else 0, sid, bytes(stream.body[:n]))
                )
                stream.body = stream.body[n:]
                self.send_window -= n
                stream.window -= n
                if last:
                    return sid
            elif stream.closed:  # answered (an error) before all was sent
                return sid
            else:
                self._read_frame()

    def _reply(self, stream: _Stream) -> bytes:
        if stream.error is not None:
            raise stream.error
        if stream.headers is None:
            raise _protocol(f"{stream.method}: the stream ended without headers")
        head = dict(stream.headers)
        trailers = dict(stream.trailers)
        if b"grpc-status" not in trailers:
            http = head.get(b":status", b"")
            code = HTTP_CODES.get(int(http), "UNKNOWN") if http.isdigit() else "INTERNAL"
            raise RpcError(code, f"no grpc-status (HTTP status {http.decode(errors='replace')})")
        status = trailers[b"grpc-status"]
        if not status.isdigit():
            raise _protocol(f"grpc-status {status!r}")
        code = CODES[int(status)] if int(status) < len(CODES) else "UNKNOWN"
        if code != "OK":
            import re

            message = re.sub(
                rb"%([0-9A-Fa-f]{2})",
                lambda m: bytes((int(m[1], 16),)),
                trailers.get(b"grpc-message", b""),
            )
            raise RpcError(code, message.decode("utf-8", "replace"))
        if head.get(b":status") != b"200":
            raise _protocol(f"HTTP status {head.get(b':status')!r}")
        if not head.get(b"content-type", b"").startswith(b"application/grpc"):
            raise _protocol(f"content-type {head.get(b'content-type')!r}")
        data = stream.data
        if len(data) < 5:
            raise RpcError("INTERNAL", f"{stream.method}: no reply message")
        compressed, length = struct.unpack_from(">BI", data)
        if compressed:
            raise RpcError("UNIMPLEMENTED", "a compressed reply (this client asks for none)")
        if len(data) != 5 + length:
            raise RpcError("INTERNAL", f"{stream.method}: not one whole reply message")
        return bytes(data[5:])

    # -- frames

    @staticmethod
    def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
        """One frame (RFC 7540 4.1): 24-bit length, type, flags, stream id, payload."""
        return struct.pack(">IBBI", len(payload), kind, flags, sid)[1:] + payload

    def _timeout(self) -> None:
        if self.deadline is None:
            self.sock.settimeout(None)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RpcError("DEADLINE_EXCEEDED", "Deadline Exceeded")
        self.sock.settimeout(left)

    @contextlib.contextmanager
    def _io(self, what: str = "connection lost: ") -> Iterator[None]:
        """A socket operation within the call's deadline: its timeout as
        DEADLINE_EXCEEDED, any other error as UNAVAILABLE (``what`` first)."""
        try:
            self._timeout()
            yield
        except TimeoutError:
            raise RpcError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None
        except OSError as exc:
            raise RpcError("UNAVAILABLE", f"{what}{exc.strerror or exc}") from None

    def _send(self, data: bytes) -> None:
        with self._io():
            self.sock.sendall(data)

    def _recv(self, n: int) -> bytes:
        while len(self.buffer) < n:
            with self._io():
                chunk = self.sock.recv(max(n - len(self.buffer), 1 << 18))
            if not chunk:
                raise RpcError("UNAVAILABLE", "the server closed the connection")
            self.buffer += chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def _frame_header(self) -> tuple[int, int, int, bytes]:
        head = self._recv(9)
        length, kind, flags, sid = struct.unpack(">IBBI", b"\0" + head)
        if length > FRAME:  # we announce no larger SETTINGS_MAX_FRAME_SIZE
            raise _protocol(f"a {length}-byte frame (over {FRAME})")
        return kind, flags, sid & 0x7FFFFFFF, self._recv(length)

    def _stream(self, sid: int, kind: str) -> _Stream:
        stream = self.streams.get(sid)
        if stream is None or stream.closed:
            raise _protocol(f"{kind} on stream {sid}, which is not open")
        return stream

    def _read_frame(self) -> None:
        """Read one frame (a header block with its CONTINUATIONs) and act on it."""
        kind, flags, sid, payload = self._frame_header()
        try:
            self._act(kind, flags, sid, payload)
        except struct.error:
            raise _protocol(f"a malformed frame (type {kind})") from None

    def _act(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        length = len(payload)
        if kind in (DATA, HEADERS) and flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise _protocol("bad padding")
            payload = payload[1 : len(payload) - payload[0]]
        if kind == DATA:
            self._data(sid, flags, payload, length)
        elif kind == HEADERS:
            self._headers(sid, flags, payload)
        elif kind == RST_STREAM:
            (code,) = struct.unpack(">I", payload)
            stream = self.streams.get(sid)
            if stream is not None and not stream.closed:
                stream.error = RpcError(
                    RESET_CODES.get(code, "INTERNAL"), f"stream reset by the server (error {code})"
                )
                stream.closed = True
        elif kind == SETTINGS:
            self._settings(sid, flags, payload)
        elif kind == PUSH_PROMISE:
            raise _protocol("PUSH_PROMISE, though this client disabled push")
        elif kind == PING:
            if sid or len(payload) != 8:
                raise _protocol("bad PING")
            if not flags & ACK:
                self._send(self._frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            last, code = struct.unpack_from(">II", payload)
            self.last_stream = last & 0x7FFFFFFF
            why = payload[8:].decode("utf-8", "replace")
            for i, stream in self.streams.items():
                if not stream.closed and (i > self.last_stream or code):
                    stream.error = RpcError(
                        "UNAVAILABLE", f"the server is going away (GOAWAY, error {code}) {why}"
                    )
                    stream.closed = True
        elif kind == WINDOW_UPDATE:
            (grow,) = struct.unpack(">I", payload)
            grow &= 0x7FFFFFFF
            if not grow:
                raise _protocol("WINDOW_UPDATE of 0")
            if sid == 0:
                self.send_window += grow
            elif sid in self.streams:
                self.streams[sid].window += grow
        elif kind == CONTINUATION:
            raise _protocol("CONTINUATION without HEADERS")
        # PRIORITY, and frame types this client does not know, are ignored (RFC 7540 4.1)

    def _data(self, sid: int, flags: int, payload: bytes, length: int) -> None:
        stream = self._stream(sid, "DATA")
        if stream.headers is None:
            raise _protocol(f"DATA before HEADERS on stream {sid}")
        # flow control counts the whole frame, padding included
        self.unacked += length
        stream.unacked += length
        if self.unacked > self.window or stream.unacked > self.window:
            raise _protocol("the server sent more than the window (FLOW_CONTROL_ERROR)")
        stream.data += payload
        if len(stream.data) > MAX_REPLY:
            raise RpcError("RESOURCE_EXHAUSTED", f"a reply over {MAX_REPLY} bytes")
        stream.closed = bool(flags & END_STREAM)
        updates = b""
        if self.unacked >= self.window // 2:
            updates += self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked))
            self.unacked = 0
        if not stream.closed and stream.unacked >= self.window // 2:
            updates += self._frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", stream.unacked))
            stream.unacked = 0
        if updates:
            self._send(updates)

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        end_stream = flags & END_STREAM
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _protocol("bad HEADERS priority")
            block = block[5:]
        while not flags & END_HEADERS:
            kind, flags, more, payload = self._frame_header()
            if kind != CONTINUATION or more != sid:
                raise _protocol(f"a header block of stream {sid} not continued")
            block += payload
        fields = self.decoder.decode(block)  # first: the decoder's table must follow
        stream = self._stream(sid, "HEADERS")
        if stream.headers is None:
            stream.headers = fields
            if end_stream:  # trailers-only: the status is in the one block
                stream.trailers = fields
        elif not end_stream:
            raise _protocol(f"a second header block without END_STREAM on stream {sid}")
        else:
            stream.trailers = fields
        if end_stream:
            stream.closed = True

    def _settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid or len(payload) % 6 or (flags & ACK and payload):
            raise _protocol("bad SETTINGS")
        if flags & ACK:
            return
        for key, value in struct.iter_unpack(">HI", payload):
            if key == 3:  # SETTINGS_MAX_CONCURRENT_STREAMS
                self.peer_streams = value
            elif key == 4:  # SETTINGS_INITIAL_WINDOW_SIZE
                if value > 0x7FFFFFFF:
                    raise _protocol("SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                for stream in self.streams.values():
                    stream.window += value - self.peer_initial
                self.peer_initial = value
            elif key == 5:  # SETTINGS_MAX_FRAME_SIZE
                if not FRAME <= value < 1 << 24:
                    raise _protocol(f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_frame = value
            # HEADER_TABLE_SIZE: this client's encoder keeps no table; the rest: nothing to do
        self._send(self._frame(SETTINGS, ACK, 0, b""))


def call(
    path: str, calls: Sequence[tuple[str, bytes]], timeout: float | None, window: int = WINDOW
) -> list[bytes]:
    """Unary calls on one new connection to the unix socket ``path``: each
    ``(/package.Service/Method, serialized request)``'s serialized reply, in
    order; RpcError for the first that failed, or when none could be made."""
    return send(path, calls, timeout, window)()


def send(
    path: str, calls: Sequence[tuple[str, bytes]], timeout: float | None, window: int = WINDOW
) -> Callable[[], list[bytes]]:
    """:func:`call` in two halves: the calls go out now, and the function
    returned waits for their replies (call it once: it closes the
    connection). ``hsu status`` imports its messages in between, while the
    kernel answers."""
    deadline = None if timeout is None else time.monotonic() + timeout
    conn = Connection(path, deadline, window)
    try:
        ids = conn.send(calls, timeout)
    except BaseException:
        conn.close()
        raise

    def replies() -> list[bytes]:
        with conn:
            return conn.replies(ids)

    return replies
