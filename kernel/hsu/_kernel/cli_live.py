"""The live view: ``hsu status``'s usage columns and ``hsu top``.

Both read the kernel's Core.Metrics (what an exporter would collect): per
instance its uptime, restarts, RSS, CPU and calls in flight; per unit the
gateway's calls (``grpc_server_handled_total``) and latency histogram
(``grpc_server_handling_seconds``), from which ``hsu top`` works out calls/s
and p99 between two refreshes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from hsu.core.v1.core_pb2 import MetricFamily, MetricPoint

#: per instance: the column and the metric it shows
USAGE = {
    "uptime": "hsu_instance_uptime_seconds",
    "restarts": "hsu_instance_restarts_total",
    "rss": "hsu_instance_resident_memory_bytes",
    "cpu": "hsu_instance_cpu_percent",
    "inflight": "hsu_instance_inflight",
}
#: the usage columns of the instance table (:func:`instance_rows`; its
#: RESTARTS are the listing's): what ``hsu status`` asks for, and all of
#: :data:`USAGE` with ``--json``
SHOWN = ("uptime", "rss", "cpu", "inflight")
#: the gateway's calls and latency, from which ``hsu top`` works out calls/s and p99
CALLS = ("grpc_server_handled_total", "grpc_server_handling_seconds")


def _labels(point: MetricPoint) -> dict[str, str]:
    return {lb.name: lb.value for lb in point.labels}


def usage(families: Iterable[MetricFamily]) -> dict[str, dict[str, float]]:
    """Per instance id: ``{"uptime": s, "restarts": n, "rss": bytes, ...}``."""
    by_name = {f.name: f for f in families}
    out: dict[str, dict[str, float]] = {}
    for column, name in USAGE.items():
        fam = by_name.get(name)
        if fam is None:
            continue
        for p in fam.points:
            # the kernel's own series: (hsu_unit, hsu_instance), in that order
            for lb in reversed(p.labels):
                if lb.name == "hsu_instance":
                    out.setdefault(lb.value, {})[column] = p.value
                    break
    return out


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell; ``right``: the numeric ones."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]  # fmt: skip
    lines = []
    for row in (header, *rows):
        cells = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def instance_rows(instances: Iterable[Any], used: dict[str, dict[str, float]]) -> list[str]:
    """``hsu status``'s instance table (Kernel.ListInstances plus usage): the
    CLI's columns (``cli.INSTANCE_COLUMNS``) with the usage ones after ADDRESS."""
    from hsu._kernel.cli import INSTANCE_COLUMNS
    from hsu._kernel.table import Column, render

    def of(i: Any) -> dict[str, float]:
        return used.get(i.instance_id, {})

    def cpu(i: Any) -> str | None:
        value = of(i).get("cpu")
        return None if value is None else f"{value:.1f}"

    def inflight(i: Any) -> str | None:
        value = of(i).get("inflight")
        return None if value is None else str(int(value))

    usage = [
        Column("UPTIME", lambda i: duration(of(i).get("uptime")), ">"),
        Column("RSS", lambda i: size(of(i).get("rss")), ">"),
        Column("CPU%", cpu, ">"),
        Column("INFLIGHT", inflight, ">"),
    ]
    at = [c.title for c in INSTANCE_COLUMNS].index("ADDRESS") + 1
    return render(instances, [*INSTANCE_COLUMNS[:at], *usage, *INSTANCE_COLUMNS[at:]])


# -- hsu top ---------------------------------------------------------------------------


def _gateway_calls(
    families: Iterable[MetricFamily],
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Per unit: calls handled so far, and the latency buckets (the gateway's
    series: no ``hsu_instance`` label)."""
    calls: dict[str, float] = {}
    buckets: dict[str, list[Any]] = {}
    for fam in families:
        if fam.name == "grpc_server_handled_total":
            for p in fam.points:
                labels = _labels(p)
                if "hsu_instance" not in labels:
                    unit = labels.get("hsu_unit", "")
                    calls[unit] = calls.get(unit, 0.0) + p.value
        elif fam.name == "grpc_server_handling_seconds":
            for p in fam.points:
                labels = _labels(p)
                if "hsu_instance" not in labels:
                    unit = labels.get("hsu_unit", "")
                    acc = buckets.setdefault(unit, [[b.upper_bound, 0] for b in p.buckets])
                    for slot, b in zip(acc, p.buckets, strict=False):
                        slot[1] += b.count
    return calls, buckets


def quantile(q: float, before: list[Any] | None, after: list[Any]) -> float | None:
    """The q-quantile (upper bound of its bucket, as Prometheus's
    histogram_quantile interpolates) of what was observed between two reads."""
    counts: list[tuple[float, float]] = [
        (float(b), float(n) - (before[i][1] if before else 0)) for i, (b, n) in enumerate(after)
    ]
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    prev_b, prev_n = 0.0, 0.0
    for b, n in counts:
        if n >= rank:
            if math.isinf(b):
                return prev_b
            if n == prev_n:
                return b
            return prev_b + (b - prev_b) * (rank - prev_n) / (n - prev_n)
        prev_b, prev_n = b, n
    return None


def top_lines(
    status: Any,
    instances: Sequence[Any],
    families: Sequence[MetricFamily],
    previous: tuple[float, Sequence[MetricFamily]] | None,
    now: float,
) -> list[str]:
    """One screen of ``hsu top``."""
    calls, buckets = _gateway_calls(families)
    before_calls: dict[str, float] = {}
    before_buckets: dict[str, list[Any]] = {}
    elapsed = 0.0
    if previous is not None:
        elapsed = now - previous[0]
        before_calls, before_buckets = _gateway_calls(previous[1])
    used = usage(families)
    units = sorted({i.unit for i in instances} | set(calls) - {""})
    rows = []
    for unit in units:
        mine = [i for i in instances if i.unit == unit]
        rate = "-"
        p99 = "-"
        if elapsed > 0:
            rate = f"{(calls.get(unit, 0.0) - before_calls.get(unit, 0.0)) / elapsed:.1f}"
            if unit in buckets:
                q = quantile(0.99, before_buckets.get(unit), buckets[unit])
                p99 = "-" if q is None else f"{q * 1000:.1f}ms"
        rss = sum(used.get(i.instance_id, {}).get("rss", 0.0) for i in mine)
        cpu = sum(used.get(i.instance_id, {}).get("cpu", 0.0) for i in mine)
        inflight = sum(used.get(i.instance_id, {}).get("inflight", 0.0) for i in mine)
        ready = sum(1 for i in mine if i.state == "ready")
        rows.append(
            (
                unit,
                f"{ready}/{len(mine)}",
                rate,
                p99,
                str(int(inflight)),
                size(rss) if mine else "-",
                f"{cpu:.1f}",
                str(sum(i.restarts for i in mine)),
            )
        )
    head = (
        f"hsu top - kernel {status.deployment}: {status.state} at {status.address}"
        f"  {time.strftime('%H:%M:%S')}"
    )
    header = ("UNIT", "READY", "CALLS/S", "P99", "INFLIGHT", "RSS", "CPU%", "RESTARTS")
    out = [head, ""]
    out += table(header, rows, {1, 2, 3, 4, 5, 6, 7})
    out += ["", *instance_rows(instances, used)]
    return out


def run_top(
    fetch: Callable[[], tuple[Any, Any, Sequence[MetricFamily]]],
    interval: float,
    iterations: int | None,
    out: TextIO = sys.stdout,
) -> None:
    """Refresh every ``interval`` seconds (``iterations`` times, or until ^C)."""
    previous: tuple[float, Sequence[MetricFamily]] | None = None
    clear = out.isatty()
    n = 0
    try:
        while iterations is None or n < iterations:
            status, listing, families = fetch()
            now = time.monotonic()
            lines = top_lines(status, list(listing.instances), families, previous, now)
            if clear:
                out.write("\x1b[H\x1b[2J")
            out.write("\n".join(lines) + "\n")
            out.flush()
            previous = (now, families)
            n += 1
            if iterations is None or n < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
