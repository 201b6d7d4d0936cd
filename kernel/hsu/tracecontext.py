"""W3C trace context (``traceparent``, ``tracestate``) for routed calls.

The kernel, ``hsu.connect``/``hsu.connect_sync`` and the SDK carry a call's
trace through these two metadata keys without OpenTelemetry: a caller's
``traceparent`` reaches the HSU as the parent of its server span, and log
records written inside a call carry its ``trace_id`` and ``span_id``. The
``otel`` plugin (contrib/hsu-plugin-otel) makes real spans of the same ids.

A sampled call the kernel routes is recorded in parts (:class:`CallTrace`):
its cold start, each pick of an instance and each attempt, as child spans
of the kernel's span of the call; each attempt's span is the
``traceparent`` its instance is sent, so the HSU's server span is the child
of the attempt that reached it. An untraced call records nothing.

https://www.w3.org/TR/trace-context/
"""

from __future__ import annotations

import contextvars
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs

from hsu.ports import CallSpan

if TYPE_CHECKING:
    from hsu.ports import Endpoint

__all__ = [
    "ATTEMPT",
    "CALL",
    "COLD_START",
    "CURRENT",
    "PICK",
    "TRACEPARENT",
    "TRACESTATE",
    "CallTrace",
    "SpanContext",
    "current",
    "from_metadata",
    "outgoing",
    "parse",
    "use",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: a tracestate longer than this is dropped (the spec's 32 members of 256)
MAX_TRACESTATE = 512
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_STATE = re.compile(r"[\x20-\x7e]*")


@attrs.frozen
class SpanContext:
    """One span's ids: what a ``traceparent`` carries, plus ``tracestate``."""

    #: 32 lower-case hex digits, not all zero
    trace_id: str
    #: 16 lower-case hex digits, not all zero
    span_id: str
    #: bit 0: sampled
    flags: int = 1
    state: str = ""
    #: the span this one is a child of (:meth:`child` sets it; a span read
    #: from a ``traceparent`` has "": its parent is not carried)
    parent_id: str = ""

    @classmethod
    def new(cls, sampled: bool = True) -> SpanContext:
        """The root span of a new trace."""
        return cls(os.urandom(16).hex(), os.urandom(8).hex(), int(sampled))

    def child(self) -> SpanContext:
        """A new span of the same trace (its parent is this one)."""
        # the constructor, not attrs.evolve: this is on every traced call's path
        return SpanContext(self.trace_id, os.urandom(8).hex(), self.flags, self.state, self.span_id)

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """``traceparent`` (and ``tracestate`` when set) as gRPC metadata."""
        if self.state:
            return ((TRACEPARENT, self.traceparent), (TRACESTATE, self.state))
        return ((TRACEPARENT, self.traceparent),)


def parse(traceparent: str, tracestate: str = "") -> SpanContext | None:
    """A ``traceparent`` header's span, or None when it is not a valid one
    (the spec: then start a new trace; never fail the call)."""
    if not isinstance(traceparent, str) or len(traceparent) > 512:
        return None
    m = _TRACEPARENT.fullmatch(traceparent.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    state = tracestate if isinstance(tracestate, str) else ""
    if len(state) > MAX_TRACESTATE or not _STATE.fullmatch(state):
        state = ""
    return SpanContext(trace_id, span_id, int(flags, 16), state.strip())


def from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> SpanContext | None:
    """The span a call's metadata names as its parent, if any."""
    parent = state = ""
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            parent = value
        elif key == TRACESTATE and isinstance(value, str):
            state = value
    return parse(parent, state) if parent else None


def outgoing(metadata: Any) -> Any:
    """A routed call's metadata: with the current span as its
    ``traceparent`` when a call is in progress and the caller set none, so
    the instance's server span is a child of the span being served (the
    caller records no span of its own for the call: a fresh id here would
    name a parent no one exports)."""
    span = CURRENT.get()
    if span is None:
        return metadata
    if metadata and any(k == TRACEPARENT for k, _ in metadata):
        return metadata
    return (*(metadata or ()), *span.metadata())


#: the span of the call being made or served in this context
CURRENT: contextvars.ContextVar[SpanContext | None] = contextvars.ContextVar(
    "hsu_span", default=None
)


def current() -> SpanContext | None:
    """The span of the call in progress (None outside a call)."""
    return CURRENT.get()


@contextmanager
def use(span: SpanContext | None) -> Iterator[SpanContext | None]:
    """Make ``span`` the current one for the ``with`` block."""
    token = CURRENT.set(span)
    try:
        yield span
    finally:
        CURRENT.reset(token)


# -- the parts of a routed call -------------------------------------------------------

#: :attr:`hsu.ports.CallSpan.name` of each part of a routed call
PICK = "hsu.pick"
ATTEMPT = "hsu.attempt"
COLD_START = "hsu.cold_start"


class CallTrace:
    """The parts of one routed call, recorded as child spans of ``span``
    while the call runs (:class:`hsu.client.route.Tries` drives it): each
    pick of an instance, each attempt and a cold start.

    A pick runs from when the call (or its retry) began looking for an
    instance to when it had one; the attempt on that instance begins then,
    with a span of its own (:attr:`attempt`) that the instance is sent as
    its ``traceparent`` (:meth:`metadata`), and ends with the try's status.
    Span ids are drawn as OpenTelemetry's SDK draws them (64 random bits of
    :mod:`random`), not from :mod:`secrets`: they identify, they guard
    nothing, and this is on the call's path.
    Only a sampled call is recorded: an untraced one makes no ``CallTrace``.
    What the call's path records is kept raw; the ids of spans no one was
    sent, the attributes and the :class:`hsu.ports.CallSpan` records are
    made only when asked (:meth:`spans`)."""

    __slots__ = ("_attempt", "_ep", "_mark", "_parts", "_picking", "_since", "_tries", "span",
                 "start_ns")  # fmt: skip

    def __init__(self, span: SpanContext) -> None:
        self.span = span
        #: when the call began (nanoseconds since the epoch)
        self.start_ns = self._mark = time.time_ns()
        #: the span id of the attempt in progress ("" between attempts)
        self._attempt = ""
        self._ep: Endpoint | None = None
        self._since = 0
        #: a pick is in progress (since ``_mark``)
        self._picking = True
        self._tries = 0
        #: (name, span id or "", start, end, what: an endpoint, a code, or
        #: the attributes, the try's index, an instance not reached)
        self._parts: list[tuple[str, str, int, int, Any, str, int, bool]] = []

    def add(self, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
        """Record a part that ended."""
        self._parts.append((name, "", start_ns, end_ns, attributes, "", 0, False))

    @property
    def attempt(self) -> SpanContext | None:
        """The span of the attempt in progress (None between attempts)."""
        if not self._attempt:
            return None
        span = self.span
        return SpanContext(span.trace_id, self._attempt, span.flags, span.state, span.span_id)

    def picked(self, ep: Endpoint) -> None:
        """An instance was picked for the next attempt: the pick ends, the
        attempt (:attr:`attempt`) begins."""
        now = time.time_ns()
        self._parts.append((PICK, "", self._mark, now, ep, "", self._tries, False))
        self._attempt = _span_id()
        self._ep = ep
        self._picking = False
        self._since = now

    def ended(self, code: str, unreachable: bool = False) -> None:
        """The attempt in progress ended with ``code`` (a status code's
        name); ``unreachable``: its instance could not be reached."""
        attempt = self._attempt
        if not attempt:
            return
        now = time.time_ns()
        tries = self._tries
        self._parts.append((ATTEMPT, attempt, self._since, now, self._ep, code, tries, unreachable))
        self._attempt = ""
        self._ep = None
        self._tries = tries + 1
        self._mark = now

    def picking(self) -> None:
        """A pick begins: the call tries again, or its first pick follows a
        cold start."""
        self._mark = time.time_ns()
        self._picking = True

    def finish(self, code: str) -> None:
        """The call ended with ``code``: an attempt still in progress ends
        with it; a pick still in progress (no instance could take the call)
        is recorded with it."""
        if self._attempt:
            self.ended(code)
        elif self._picking:
            self._picking = False
            self._parts.append(
                (PICK, "", self._mark, time.time_ns(), None, code, self._tries, False)
            )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The ``traceparent`` (and ``tracestate``) for the attempt in
        progress: its own span (the call's between attempts)."""
        span = self.span
        parent = f"00-{span.trace_id}-{self._attempt or span.span_id}-{span.flags:02x}"
        if span.state:
            return ((TRACEPARENT, parent), (TRACESTATE, span.state))
        return ((TRACEPARENT, parent),)

    def spans(self) -> tuple[CallSpan, ...]:
        """The parts recorded so far, as :class:`hsu.ports.CallSpan` (a
        part's id is drawn once: asked again, the same)."""
        parent = self.span.span_id
        out = []
        parts = self._parts
        for i, part in enumerate(parts):
            name, span_id, start, end, what, code, tries, unreachable = part
            if not span_id:
                span_id = _span_id()
                parts[i] = (name, span_id, start, end, what, code, tries, unreachable)
            if name == ATTEMPT:
                attributes = _attempt(what, code, tries, unreachable)
            elif name == PICK:
                attributes = {"hsu.attempt": tries}
                if what is not None:
                    attributes.update({"hsu.unit": what.unit, "hsu.instance": what.instance_id})
                if code:
                    attributes["error.type"] = code
            else:
                attributes = what
            out.append(CallSpan(name, span_id, parent, start, end, attributes))
        return tuple(out)


def _span_id() -> str:
    """A new span id: 16 hex digits, not all zero."""
    return f"{random.getrandbits(64) or 1:016x}"


def _attempt(ep: Endpoint, code: str, tries: int, unreachable: bool) -> dict[str, Any]:
    """An attempt's attributes: OpenTelemetry's for an RPC client span
    (``server.*``, ``rpc.response.status_code``, ``error.type``) and hsu's."""
    host, _, port = ep.address.rpartition(":")
    attributes: dict[str, Any] = {
        "hsu.unit": ep.unit,
        "hsu.instance": ep.instance_id,
        "server.address": host.strip("[]") if host and port.isdigit() else ep.address,
    }
    if host and port.isdigit():
        attributes["server.port"] = int(port)
    attributes["rpc.response.status_code"] = code
    attributes["hsu.retry"] = tries > 0
    if tries:
        attributes["hsu.resend_count"] = tries
    if code != "OK":
        attributes["error.type"] = code
    if unreachable:
        attributes["hsu.unreachable"] = True
    return attributes


#: the parts of the routed call being served in this context, when it is
#: traced and sampled (the kernel's gateway sets it beside :data:`CURRENT`)
CALL: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar("hsu_call", default=None)
