"""What nginx tells the kernel of each call it routed: one access-log line
per call, sent to the kernel as a datagram, counted and told to
``hsu_routed_call`` as the Python gateway's calls are.

nginx writes the line (``log_format hsu_calls escape=json``, :func:`log_format`)
through its syslog client to a UDP socket the kernel binds on loopback
(``access_log syslog:server=127.0.0.1:PORT``): one ``sendto`` per call in
the worker, which never blocks it (the socket is non-blocking; a line the
kernel's queue has no room for is lost, and counted, never waited for). The
kernel reads the socket with ``loop.add_reader``: nothing polls, and its loop
never waits on nginx. A unix datagram socket was the first choice, but Linux
queues at most ``net.unix.max_dgram_qlen`` datagrams on one (10 by default),
after which nginx's ``sendto`` fails and the line is lost; a UDP socket
queues by bytes (its receive buffer, :data:`RECEIVE_BUFFER`). And when the
kernel runs as root, nginx's workers (``nobody``) could not reach a socket in
the 0700 state directory. Any local process can send to a loopback port, so
each line carries a random token written only into nginx.conf (in the 0700
state directory): a datagram without it is dropped (``reason="token"``).

The line is the token and the call's fields, tab-separated (``escape=json``
leaves no tab or other control character in a value; splitting costs less
than decoding JSON). Each datagram is parsed defensively: one that is too
long, not UTF-8, without the token or the right number of fields, or with a
field out of shape (a method that is no
``/package.Service/Method``, a unit nginx.conf never named) is dropped and
counted in ``hsu_nginx_call_log_dropped_total{reason}``; nothing a datagram
holds can raise out of the reader. Lines lost before the kernel read them
(its receive queue full) are ``hsu_nginx_call_log_lost_total``, read from
``/proc/net/udp`` at collection time.

nginx does not know a method's kind (unary, streaming): the first call to an
interface has the kernel ask the instance's reflection service, as the Python
gateway does; until it answers, calls are counted as ``bidi_stream`` (the
Python gateway counts its first calls so too).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Collection, Iterable
from typing import NamedTuple

import grpc
from loguru import logger

from hsu import tracecontext
from hsu.metrics import GRPC_TYPES, Family, Point, method_kind
from hsu.ports import KernelAPI, RoutedCall

#: the longest datagram taken (a longer one is dropped, ``reason="oversized"``)
MAX_LINE = 8192
#: datagrams read per wake-up of the loop, so a flood cannot hold it
BATCH = 256
#: seconds the reader rests after a wake-up that found lines: under load the
#: kernel wakes at most this often and reads what queued meanwhile in one go
#: (idle, it waits for the next datagram: nothing polls)
REST = 0.02
#: bytes the kernel's receive queue holds (Linux doubles it, and counts
#: about 1 KiB per short datagram; capped by ``net.core.rmem_max`` unless the
#: kernel runs as root): about 3,300 lines of 300 bytes
RECEIVE_BUFFER = 2 * 2**20
#: Linux's SO_RCVBUFFORCE (Python's socket module does not name it)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: the ``log_format`` name
FORMAT = "hsu_calls"
#: ``/package.Service/Method``
METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*")
#: gRPC status codes by number
CODES = {c.value[0]: c.name for c in grpc.StatusCode}
#: how a call's HTTP status reads when no grpc-status came back: a client
#: that went away (nginx's 499), else gRPC's HTTP-to-status mapping
HTTP_CODES = {499: "CANCELLED", 400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "UNIMPLEMENTED", 429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
              504: "UNAVAILABLE"}  # fmt: skip
#: the line's fields after the token, tab-separated, in this order: name,
#: nginx variable (``escape=json`` escapes control characters, so a value
#: holds no tab; the kernel decodes none of it: what it uses is checked)
FIELDS = (
    ("method", "$request_uri"),
    ("unit", "$hsu_unit"),
    ("status", "$status"),
    ("trailer", "$upstream_trailer_grpc_status"),
    ("header", "$upstream_http_grpc_status"),
    ("sent", "$sent_http_grpc_status"),
    ("took", "$request_time"),
    ("end", "$msec"),
    ("address", "$upstream_addr"),
    ("traceparent", "$http_traceparent"),
    ("tracestate", "$http_tracestate"),
)


def log_format(token: str) -> str:
    """The ``log_format`` directive of the call log (``token``: hex digits)."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", token):
        raise ValueError("the call log's token must be hex digits")
    body = "\t".join([token, *(variable for _, variable in FIELDS)])
    return f"  log_format {FORMAT} escape=json '{body}';"


class Line(NamedTuple):
    """One call, as nginx's line tells it."""

    method: str
    unit: str
    code: str
    start_ns: int
    end_ns: int
    #: the instance's address (the last one tried)
    address: str
    traceparent: str
    tracestate: str


class Dropped(ValueError):
    """A datagram that is no call line; ``reason`` is its label."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason = reason


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` takes "²" too, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def _seconds_ns(text: str) -> int:
    """``1733117952.123`` (nginx's ``$msec``, ``$request_time``) in nanoseconds."""
    whole, _, frac = text.partition(".")
    if not _digits(whole) or (frac and not _digits(frac)) or len(frac) > 9 or len(whole) > 12:
        raise Dropped("malformed", f"not a number of seconds: {text[:32]!r}")
    return int(whole) * 10**9 + int(frac.ljust(9, "0") or 0)


def parse(data: bytes, token: str, units: Collection[str]) -> Line:
    """The call a datagram tells of; :class:`Dropped` when it tells none."""
    import hmac  # not at start (docs/benchmarks.md, Footprint)

    if len(data) > MAX_LINE:
        raise Dropped("oversized", f"{len(data)} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise Dropped("malformed", "not UTF-8") from None
    fields = text.split("\t")
    if len(fields) != len(FIELDS) + 1:
        raise Dropped("malformed", f"{len(fields)} fields, not {len(FIELDS) + 1}")
    # syslog's "<PRI>TIMESTAMP TAG: " comes before the token
    if not hmac.compare_digest(fields[0][-len(token) :].encode(), token.encode()):
        raise Dropped("token", "without the call log's token")
    (method, unit, status, trailer, header, sent, took, end, address, traceparent, tracestate) = (
        fields[1:]
    )
    if len(method) > 1024 or not METHOD.fullmatch(method):
        raise Dropped("malformed", f"method {method[:80]!r}")
    if unit not in units:
        raise Dropped("malformed", f"unit {unit[:80]!r}")
    if not _digits(status) or len(status) > 3:
        raise Dropped("malformed", f"status {status[:16]!r}")
    code = None
    for grpc_status in (trailer, header, sent):
        if grpc_status:
            # with several tries, ``$upstream_*`` lists them: the last one counts
            grpc_status = grpc_status.rpartition(" ")[2]
            if not _digits(grpc_status) or int(grpc_status) not in CODES:
                raise Dropped("malformed", f"grpc-status {grpc_status[:16]!r}")
            code = CODES[int(grpc_status)]
            break
    if code is None:
        code = HTTP_CODES.get(int(status), "UNKNOWN")
    end_ns = _seconds_ns(end)
    took_ns = _seconds_ns(took)
    # "a, b" for tries of one upstream, "a : b" across internal redirects
    address = address.rpartition(" ")[2]
    return Line(method, unit, code, end_ns - took_ns, end_ns, address, traceparent, tracestate)


class CallLog:
    """The kernel's end of the call log: its socket, its reader, its counts."""

    def __init__(self, kernel: KernelAPI):
        self.kernel = kernel
        self.token = os.urandom(16).hex()
        #: the units nginx.conf names (a line naming another is dropped)
        self.units: set[str] = set()
        #: grpc_type by method, as instances' reflection told it
        self.kinds: dict[str, str] = {}
        self._learning: dict[str, asyncio.Task[None]] = {}
        self.sock: socket.socket | None = None
        self.received = 0
        self._dropped = kernel.metrics.counter(
            "hsu_nginx_call_log_dropped_total",
            "datagrams on the nginx call log that told no call (reason: oversized,"
            " malformed, token)",
            ("reason",),
        )
        self._warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resting: asyncio.TimerHandle | None = None

    @property
    def address(self) -> str:
        """Where nginx sends its lines (``127.0.0.1:PORT``)."""
        assert self.sock is not None
        return "{}:{}".format(*self.sock.getsockname()[:2])

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            if os.geteuid() == 0:  # past net.core.rmem_max (which may be 208 KiB)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._woken)
        self.kernel.metrics.add_collector(f"nginx call log {id(self)}", self.collect)

    async def close(self) -> None:
        tasks = list(self._learning.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.shut()

    def shut(self) -> None:
        """Close the socket (the port is free again) and stop reading it; a
        question to an instance's reflection still asked is cancelled."""
        for task in self._learning.values():
            task.cancel()
        self.kernel.metrics.remove_collector(f"nginx call log {id(self)}")
        sock, self.sock = self.sock, None
        if self._resting is not None:
            self._resting.cancel()
            self._resting = None
        if sock is not None:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop
                    self._loop.remove_reader(sock.fileno())
            sock.close()

    def _woken(self) -> None:
        """Lines came: read them, then rest (:data:`REST`) before the next
        wake-up, so that under load one wake-up reads many lines."""
        sock, loop = self.sock, self._loop
        if sock is None or loop is None:
            return
        if self._readable():
            return  # a full batch: more is queued, read on at the next turn
        loop.remove_reader(sock.fileno())
        self._resting = loop.call_later(REST, self._rested)

    def _rested(self) -> None:
        self._resting = None
        sock, loop = self.sock, self._loop
        if sock is not None and loop is not None:
            loop.add_reader(sock.fileno(), self._woken)

    def drain(self) -> None:
        """Read what is queued (nginx has ended: its last lines)."""
        while self.sock is not None and self._readable():
            pass

    def _readable(self) -> bool:
        """Read up to :data:`BATCH` datagrams; True when there may be more."""
        sock = self.sock
        if sock is None:
            return False
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_LINE + 1)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                logger.warning("gateway_nginx: reading the call log failed: {}", exc)
                return False
            self.received += 1
            self.take(data)
        return True

    def take(self, data: bytes) -> None:
        """Count and tell the call ``data`` tells of, or drop it (counted)."""
        try:
            line = parse(data, self.token, self.units)
        except Exception as exc:  # Dropped, or what parse did not foresee
            reason = exc.reason if isinstance(exc, Dropped) else "malformed"
            self._dropped.labels(reason).inc()
            if not self._warned:
                self._warned = True
                logger.warning(
                    "gateway_nginx: a datagram on the call log told no call ({}: {});"
                    " dropped (each is counted in hsu_nginx_call_log_dropped_total)",
                    reason,
                    exc,
                )
            return
        try:
            self.report(line)
        except Exception:
            logger.exception("gateway_nginx: counting a call from nginx's log failed")

    def report(self, line: Line) -> None:
        kind = self.kinds.get(line.method)
        if kind is None:
            kind = "bidi_stream"
            self.learn(line.method[1:].partition("/")[0], line.address)
        span = None
        if line.traceparent:
            caller = tracecontext.parse(line.traceparent, line.tracestate)
            # the kernel was not in the call's path: its span of the call is
            # made now, the caller's child (the instance's span is its sibling)
            span = caller.child() if caller is not None else None
        self.kernel.report_routed_call(
            RoutedCall(
                kind=kind,
                method=line.method,
                unit=line.unit,
                code=line.code,
                start_ns=line.start_ns,
                end_ns=line.end_ns,
                span=span,
            )
        )

    # -- method kinds ------------------------------------------------------------

    def learn(self, interface: str, address: str) -> None:
        """Have the instance at ``address`` asked for ``interface``'s kinds,
        unless it was asked already."""
        if interface in self._learning or not address or len(self._learning) >= 1000:
            return
        self._learning[interface] = asyncio.ensure_future(self._ask(interface, address))

    async def _ask(self, interface: str, address: str) -> None:
        """The kinds of ``interface``'s methods, from the reflection service of
        the instance at ``address`` (asked once per interface)."""
        from google.protobuf import descriptor_pb2
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=interface)
                async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
                    for raw in reply.file_descriptor_response.file_descriptor_proto:
                        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                        for svc in fd.service:
                            name = f"{fd.package}.{svc.name}" if fd.package else svc.name
                            if name == interface:
                                for m in svc.method:
                                    kind = GRPC_TYPES[
                                        method_kind(m.client_streaming, m.server_streaming)
                                    ]
                                    self.kinds[f"/{interface}/{m.name}"] = kind
                    break
        except (grpc.aio.AioRpcError, ValueError) as exc:
            logger.debug("gateway_nginx: no reflection for {} at {}: {!r}", interface, address, exc)

    # -- collection --------------------------------------------------------------

    def collect(self) -> Iterable[Family]:
        lost = self.lost()
        if lost is not None:
            yield Family(
                "hsu_nginx_call_log_lost_total",
                "counter",
                "nginx call-log lines lost before the kernel read them (its queue was full)",
                (Point((), float(lost)),),
            )

    def lost(self) -> int | None:
        """Datagrams the socket's full queue dropped (Linux's ``/proc/net/udp``)."""
        sock = self.sock
        if sock is None:
            return None
        inode = str(os.fstat(sock.fileno()).st_ino)
        try:
            with open("/proc/net/udp") as f:
                for row in f:
                    cols = row.split()
                    if len(cols) >= 13 and cols[9] == inode:
                        return int(cols[-1])
        except (OSError, ValueError):
            return None
        return None
