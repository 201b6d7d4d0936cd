"""Log record fields and formats shared by the kernel and the SDK.

Every record carries ``unit``, ``instance`` and ``pid`` in its ``extra``
(empty unit and instance for the kernel's own records, the logging process's
pid unless a record is bound to another: an HSU's output line carries the
HSU's), and, inside a call, ``trace_id`` and ``span_id``
(:mod:`hsu.tracecontext`). ``json`` writes each record with loguru's
serializer: one JSON object a line (docs/tracing.md, "Structured logs").
"""

from __future__ import annotations

import functools
import os
from typing import Any

from hsu.tracecontext import CURRENT

#: the formats ``--log-format`` and ``kernel.log_format`` accept
FORMATS = ("text", "json")
#: how the kernel tells its HSUs (and ``hsu``'s own commands) the format
ENV_LOG_FORMAT = "HSU_LOG_FORMAT"


def fields(record: Any) -> None:
    """A loguru patcher: the context fields, and ``where`` for the text format."""
    extra = record["extra"]
    parts = [str(extra[k]) for k in ("instance", "stream") if k in extra]
    extra["where"] = f"[{' '.join(parts)}] " if parts else ""
    extra.setdefault("unit", "")
    extra.setdefault("instance", "")
    extra.setdefault("pid", os.getpid())
    span = CURRENT.get()
    if span is not None:
        extra.setdefault("trace_id", span.trace_id)
        extra.setdefault("span_id", span.span_id)


def _lib_dirs_once() -> None:
    """Every ``logger.add`` makes an exception formatter that lists the
    library directories from :mod:`sysconfig` again (181 ``get_path`` calls,
    about 4 ms); ``hsu run`` adds four sinks before its first spawn. The list
    is the same each time: loguru computes it once per process here."""
    try:
        from loguru._better_exceptions import ExceptionFormatter
    except ImportError:  # a loguru laid out otherwise: it keeps its own
        return
    get = getattr(ExceptionFormatter, "_get_lib_dirs", None)
    if callable(get) and not hasattr(get, "cache_info"):
        ExceptionFormatter._get_lib_dirs = staticmethod(functools.cache(get))  # type: ignore[method-assign]


_lib_dirs_once()


def sink_options(fmt: str, text_format: str) -> dict[str, Any]:
    """``logger.add`` options for ``fmt``: ``text_format``, or one JSON object a line."""
    if fmt == "json":
        return {"serialize": True, "format": "{message}", "colorize": False}
    return {"format": text_format}
