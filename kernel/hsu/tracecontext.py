"""W3C trace context (``traceparent``, ``tracestate``) for routed calls.

The kernel, ``hsu.connect``/``hsu.connect_sync`` and the SDK carry a call's
trace through these two metadata keys without OpenTelemetry: a caller's
``traceparent`` reaches the HSU as the parent of its server span, and log
records written inside a call carry its ``trace_id`` and ``span_id``. The
``otel`` plugin (contrib/hsu-plugin-otel) makes real spans of the same ids.

https://www.w3.org/TR/trace-context/
"""

from __future__ import annotations

import contextvars
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

__all__ = [
    "CURRENT",
    "TRACEPARENT",
    "TRACESTATE",
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
        return cls(secrets.token_hex(16), secrets.token_hex(8), int(sampled))

    def child(self) -> SpanContext:
        """A new span of the same trace (its parent is this one)."""
        # the constructor, not attrs.evolve: this is on every traced call's path
        return SpanContext(
            self.trace_id, secrets.token_hex(8), self.flags, self.state, self.span_id
        )

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
    """A routed call's metadata: with a child of the current span as its
    ``traceparent`` when a call is in progress and the caller set none."""
    span = CURRENT.get()
    if span is None:
        return metadata
    if metadata and any(k == TRACEPARENT for k, _ in metadata):
        return metadata
    return (*(metadata or ()), *span.child().metadata())


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
