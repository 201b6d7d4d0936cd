"""Observability benchmark: what metrics and trace context cost.

Run with ``python bench/metrics.py`` (hsu with its ``prometheus`` extra, and
hsu-echo, installed). Kernels run as ``python -m hsu run`` in temp dirs; this
process is the client. One run measures, side by side:

1. **Throughput, metrics on against off.** ``Echo`` with no delay,
   ``--inflight`` calls at a time, on two kernels with one echo instance
   each: one with the defaults (the gateway counts every routed call, the HSU
   counts what it serves, ``hsu.connect`` counts as a client), one with
   ``kernel.metrics: false`` and ``HSU_METRICS=0`` in the HSU's and the
   client's environment (nothing counted anywhere). A third column is the
   metrics-on kernel again with every call carrying a sampled W3C
   ``traceparent`` (the gateway makes a span of its own and records its
   parts, a pick and an attempt, whose span it forwards; the SDK serves the
   call under a child span; no exporter). Through the gateway
   (a plain stub on the kernel's address) and through ``hsu.connect``, in
   rotating rounds; the median of each.
2. **A scrape with many instances.** A kernel with ``--instances`` instances
   of a ``sleep`` unit (``kind: managed``: a process, no gRPC, no HSU
   metrics to ask for) and the ``prometheus`` exporter: ``GET /metrics``
   ``--scrapes`` times, the median time and the page's size.
3. **Kernel RSS with the prometheus exporter against without.** Two kernels
   with one echo instance each, the same calls through both, one with
   ``kernel.exporters: [prometheus]`` scraped ``--scrapes`` times; then each
   kernel process's RSS.

It prints the results and replaces the ``## Observability`` section of
``docs/benchmarks.md`` unless ``--no-write``. Everything listens on
127.0.0.1 or a unix socket in a temp dir; every process it starts is stopped
by pid and the run fails if any is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import psutil
from _common import (
    DOC,
    ROOT,
    RUN_MARK,
    TRACKER,
    interrupted,
    reap_leftovers,
    versions,
    write_section,
)

import hsu
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.tracecontext import SpanContext
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

HEADING = "## Observability"
#: the machine's 1-minute load average as the run starts and ends
LOAD: list[float] = []
INTERFACE = "hsu.echo.v1.Echo"
PLAIN = (("grpc.enable_http_proxy", 0),)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env["HSU_BENCH_RUN"] = RUN_MARK
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_unit(name: str, *, metrics: bool) -> str:
    """One echo instance, started with the kernel; ``metrics=False``: the HSU
    counts nothing either (``HSU_METRICS=0``)."""
    lines = [
        f"{name}:",
        "  command: [python, -m, hsu_echo]",
        f"  interfaces: [{INTERFACE}]",
        "  start: at-start",
        "  min_instances: 1",
        "  max_instances: 1",
        "  startup_timeout: 60",
        "  stop_grace: 2",
    ]
    if not metrics:
        lines.append('  env: {HSU_METRICS: "0"}')
    return "\n".join(lines)


def sleep_unit(count: int) -> str:
    return "\n".join(
        [
            "sleeper:",
            "  kind: managed",
            '  command: [sleep, "1e6"]',
            "  start: at-start",
            f"  min_instances: {count}",
            f"  max_instances: {count}",
            "  stop_grace: 2",
        ]
    )


class KernelProc:
    """``python -m hsu run`` on a deployment of one unit, in a temp dir."""

    def __init__(
        self,
        tag: str,
        unit: str,
        *,
        metrics: bool = True,
        prometheus: bool = False,
        otel: str = "",
    ):
        self.dir = Path(tempfile.mkdtemp(prefix=f"hb-metrics-{tag}-"))
        self.address = f"127.0.0.1:{free_port()}"
        self.control = f"unix:{self.dir}/control.sock"
        self.metrics_address = f"127.0.0.1:{free_port()}" if prometheus else ""
        names = [n for n, on in (("prometheus", prometheus), ("otel", bool(otel))) if on]
        exporters = "[" + ", ".join(names) + "]"
        self.children: list[psutil.Process] = []
        self.text = (
            textwrap.dedent(f"""\
            name: bench-metrics
            kernel:
              address: {self.address}
              control: {self.control}
              drain_grace: 1
              metrics: {"true" if metrics else "false"}
              exporters: {exporters}
            """)
            + (f"prometheus:\n  address: {self.metrics_address}\n" if prometheus else "")
            + (f"plugins: [otel]\notel:\n  endpoint: {otel}\n" if otel else "")
            + "units:\n"
            + textwrap.indent(unit, "  ")
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        (self.dir / "deployment.yaml").write_text(self.text)
        out = open(self.dir / "kernel.out", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hsu", "run", "deployment.yaml"],
            cwd=self.dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
        out.close()
        TRACKER.add([self.proc.pid])
        self.channel = grpc.insecure_channel(self.control, options=PLAIN)

    @property
    def stub(self) -> Any:
        assert self.channel is not None
        return kernel_pb2_grpc.KernelStub(self.channel)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "kernel.out").read_text().splitlines()[-30:])
        return "(no output)"

    def ready(self, count: int, timeout: float = 120.0) -> list[Any]:
        """Wait until ``count`` instances are ready."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the kernel exited:\n{self.tail()}")
            with contextlib.suppress(grpc.RpcError):
                if self.stub.Status(kernel_pb2.StatusRequest(), timeout=2).state == "running":
                    insts = self.stub.ListInstances(
                        kernel_pb2.ListInstancesRequest(), timeout=10
                    ).instances
                    TRACKER.add(i.pid for i in insts if i.pid)
                    ready = [i for i in insts if i.state == "ready"]
                    if len(ready) >= count:
                        return ready
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} instances not ready in {timeout:g}s:\n{self.tail()}")
            time.sleep(0.1)

    def watch_children(self) -> None:
        """Remember the kernel's children (its HSUs) for :meth:`cpu`."""
        assert self.proc is not None
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def cpu(self) -> float:
        """CPU seconds the kernel and its remembered children used so far."""
        assert self.proc is not None
        total = 0.0
        for p in [psutil.Process(self.proc.pid), *self.children]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss(self) -> int:
        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def scrape(self) -> tuple[float, int]:
        """One ``GET /metrics``: seconds and bytes."""
        t = time.perf_counter()
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=60) as r:
            page = r.read()
        took = time.perf_counter() - t
        if b"hsu_instances" not in page:
            raise RuntimeError("the page has no hsu_instances")
        return took, len(page)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                TRACKER.add(k.pid for k in psutil.Process(proc.pid).children(recursive=True))
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- 1. throughput ------------------------------------------------------------------

#: a discarding OTLP/gRPC receiver, in a process of its own; prints its port,
#: then on SIGTERM the number of spans it was sent
RECEIVER = """
import signal, sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as m
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mg
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as t
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tg
spans = 0
class Traces(tg.TraceServiceServicer):
    def Export(self, request, context):
        global spans
        spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return t.ExportTraceServiceResponse()
class Metrics(mg.MetricsServiceServicer):
    def Export(self, request, context):
        return m.ExportMetricsServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(2))
tg.add_TraceServiceServicer_to_server(Traces(), server)
mg.add_MetricsServiceServicer_to_server(Metrics(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
def done(*_):
    print(spans, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
server.wait_for_termination()
"""


class ReceiverProc:
    """:data:`RECEIVER` as a child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER],
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        TRACKER.add([self.proc.pid])
        assert self.proc.stdout is not None
        self.endpoint = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def stop(self) -> int:
        """Stop it; the spans it received."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return int(out.strip() or 0)


def has_otel() -> bool:
    try:
        from importlib.metadata import version

        version("hsu-plugin-otel")
    except Exception:
        return False
    return True


async def window(
    stub: Any, kernel: KernelProc, inflight: int, seconds: float, traced: bool
) -> tuple[float, float]:
    """Calls per second with ``inflight`` callers for ``seconds``, and the
    CPU seconds per call the kernel and its HSU used meanwhile; ``traced``:
    each call carries a sampled ``traceparent`` (one trace per caller)."""
    req = echo_pb2.EchoRequest(message="x")
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        md = SpanContext.new().metadata() if traced else None
        while time.perf_counter() < stop:
            await stub.Echo(req, timeout=30, metadata=md)
            done += 1

    cpu = kernel.cpu()
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    took = time.perf_counter() - t
    return done / took, (kernel.cpu() - cpu) / max(done, 1)


#: (variant, the kernel it runs on, calls carry a traceparent)
VARIANTS = [
    ("off", "off", False),
    # an A/A control: a second kernel and HSU exactly as *off*; its ratio to
    # *off* is what two processes differ by with nothing changed
    ("off, a second kernel", "off2", False),
    ("on", "on", False),
    ("on + traceparent", "on", True),
]
OTEL_VARIANT = ("on + traceparent + otel", "otel", True)


async def bench_throughput(
    inflight: int, rounds: int, seconds: float
) -> tuple[dict[str, dict[str, dict[str, float]]], int | None]:
    """Per path, per variant: the median rate, CPU per call, and ratios to
    *off*; and the spans the OTLP receiver got (None: no otel variant)."""
    variants = list(VARIANTS)
    receiver = None
    kernels = {
        "on": KernelProc("on", echo_unit("echo", metrics=True), metrics=True),
        "off": KernelProc("off", echo_unit("echo", metrics=False), metrics=False),
        "off2": KernelProc("off2", echo_unit("echo", metrics=False), metrics=False),
    }
    if has_otel():
        receiver = ReceiverProc()
        kernels["otel"] = KernelProc(
            "otel", echo_unit("echo", metrics=True), otel=receiver.endpoint
        )
        variants.append(OTEL_VARIANT)
    raw: dict[tuple[str, str], list[tuple[float, float]]] = {}
    spans = None
    try:
        for k in kernels.values():
            k.start()
        for k in kernels.values():
            await asyncio.to_thread(k.ready, 1)
            k.watch_children()
        opened: list[Any] = []
        stubs: dict[tuple[str, str], Any] = {}
        try:
            for name, k in kernels.items():
                # hsu.connect reads HSU_METRICS when it is made: off counts nothing
                if name in ("off", "off2"):
                    os.environ["HSU_METRICS"] = "0"
                try:
                    routed = hsu.connect(k.control)
                finally:
                    os.environ.pop("HSU_METRICS", None)
                plain = grpc.aio.insecure_channel(k.address, options=PLAIN)
                opened += [routed, plain]
                stubs["hsu.connect", name] = echo_pb2_grpc.EchoStub(routed)
                stubs["gateway", name] = echo_pb2_grpc.EchoStub(plain)
            for path in ("gateway", "hsu.connect"):
                for _, kname, traced in variants:  # warm up
                    await window(stubs[path, kname], kernels[kname], inflight, 0.3, traced)
            for r in range(rounds):
                for path in ("gateway", "hsu.connect"):
                    at = r % len(variants)
                    for variant, kname, traced in variants[at:] + variants[:at]:
                        got = await window(
                            stubs[path, kname], kernels[kname], inflight, seconds, traced
                        )
                        raw.setdefault((path, variant), []).append(got)
        finally:
            for c in opened:
                await c.close()
    finally:
        for k in kernels.values():
            k.stop()
        if receiver is not None:
            spans = receiver.stop()
    # each round's ratios (its windows ran back to back, so a change in the
    # machine's load between rounds cancels out), then their median
    result: dict[str, dict[str, dict[str, float]]] = {}
    for path in ("gateway", "hsu.connect"):
        off = raw[path, "off"]
        out = result[path] = {}
        for variant, _, _ in variants:
            xs = raw[path, variant]
            out[variant] = {
                "rate": statistics.median(r for r, _ in xs),
                "cpu": statistics.median(c for _, c in xs),
                "rate/off": statistics.median(a[0] / b[0] for a, b in zip(xs, off, strict=True)),
                "cpu/off": statistics.median(a[1] / b[1] for a, b in zip(xs, off, strict=True)),
            }
        print(
            f"  {path}: "
            + "; ".join(
                f"{v} {d['rate']:.0f}/s ({d['rate/off']:.3f}x), {d['cpu'] * 1e6:.0f} us CPU/call"
                f" ({d['cpu/off']:.3f}x)"
                for v, d in out.items()
            )
        )
    return result, spans


def microcosts(number: int = 20_000) -> dict[str, float]:
    """Seconds per call of what metrics and tracing add to a routed call, in
    this process (best of 5 runs of ``number``; contention moves the best
    run little): counting it (``CallMetrics.observe``, done by the gateway
    and again by the HSU), the kernel's span (read the caller's
    ``traceparent``, make the child, write it out), recording the parts of
    a sampled call (a pick and an attempt, whose span is what the instance
    is sent), making them ``CallSpan`` records for ``hsu_routed_call``, and
    building the span records the otel exporter hands to its batch (the
    call's, and its two parts')."""
    import timeit

    from hsu.metrics import CallMetrics, Registry
    from hsu.ports import Endpoint, RoutedCall
    from hsu.tracecontext import CallTrace, from_metadata

    calls = CallMetrics(Registry(), "server")
    t0 = time.perf_counter()
    md = SpanContext.new().metadata()

    def count() -> None:
        calls.observe("unary_unary", "/hsu.echo.v1.Echo/Echo", "echo", None, t0)

    def trace() -> None:
        parent = from_metadata(md)
        assert parent is not None
        parent.child().metadata()

    ep = Endpoint(instance_id="echo-1", unit="echo", address="127.0.0.1:5000",
                  interfaces=(INTERFACE,))  # fmt: skip

    kernels_span = SpanContext.new().child()

    def parts() -> CallTrace:
        recorder = CallTrace(kernels_span)
        recorder.picked(ep)
        recorder.metadata()
        recorder.ended("OK")
        recorder.finish("OK")
        return recorder

    recorded = parts()

    def best(fn: Any) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number

    out = {
        "count": best(count),
        "trace": best(trace),
        "parts": best(parts),
        "records": best(recorded.spans),
    }
    if has_otel():
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from hsu_plugin_otel import part_of, span_of

        span = recorded.span
        resource = Resource.create({"service.name": "bench"})
        scope = InstrumentationScope("bench")
        call = RoutedCall("unary", f"/{INTERFACE}/Echo", "echo", "OK", 1, 2, span,
                          recorded.spans())  # fmt: skip

        def otel() -> None:
            span_of(span, call.method, "OK", 1, 2, {"hsu.unit": "echo"}, resource, scope)

        def otel_parts() -> None:
            for part in call.spans:
                part_of(call, part, resource, scope)

        out["otel"] = best(otel)
        out["otel parts"] = best(otel_parts)
        # what the exporter's thread does with them: OTLP's protobuf encoding
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        whole = span_of(span, call.method, "OK", 1, 2, {"hsu.unit": "echo"}, resource, scope)
        made = [part_of(call, part, resource, scope) for part in call.spans]
        batch, batch_parts = [whole] * 100, made * 100
        n = max(1, number // 400)
        for key, spans in (("encode", batch), ("encode parts", batch_parts)):
            took = timeit.repeat(lambda s=spans: encode_spans(s).SerializeToString(), number=n,
                                 repeat=5)  # fmt: skip
            out[key] = min(took) / n / 100
    print("  per call: " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in out.items()))
    return out


# -- 2. a scrape with many instances -----------------------------------------------


def bench_scrape(instances: int, scrapes: int) -> dict[str, Any]:
    k = KernelProc("scrape", sleep_unit(instances), prometheus=True)
    try:
        k.start()
        t = time.monotonic()
        k.ready(instances, timeout=max(120.0, instances * 0.5))
        started = time.monotonic() - t
        k.scrape()  # the first: the sampler's first reading of every process
        times, sizes, answers = [], [], []
        for _ in range(scrapes):
            # meanwhile, how long the kernel takes to answer Kernel.Status:
            # what a scrape costs everyone else on its event loop
            done = threading.Event()

            def ask(done: threading.Event = done) -> None:
                while not done.is_set():
                    t = time.perf_counter()
                    k.stub.Status(kernel_pb2.StatusRequest(), timeout=30)
                    answers.append(time.perf_counter() - t)

            asker = threading.Thread(target=ask)
            asker.start()
            try:
                took, size = k.scrape()
            finally:
                done.set()
                asker.join()
            times.append(took)
            sizes.append(size)
        rss = k.rss()
    finally:
        k.stop()
    out = {
        "instances": instances,
        "ready_in": started,
        "median": statistics.median(times),
        "max": max(times),
        "size": statistics.median(sizes),
        "rss": rss,
        "status_max": max(answers),
        "status_median": statistics.median(answers),
    }
    print(
        f"  {instances} instances: scrape median {out['median'] * 1000:.0f} ms"
        f" (max {out['max'] * 1000:.0f} ms), {out['size'] / 1024:.0f} KiB; Kernel.Status"
        f" meanwhile: median {out['status_median'] * 1000:.1f} ms, max"
        f" {out['status_max'] * 1000:.0f} ms"
    )
    return out


# -- 3. kernel RSS ------------------------------------------------------------------


async def bench_rss(scrapes: int, calls: int) -> dict[str, int]:
    kernels = {
        "without": KernelProc("rss0", echo_unit("echo", metrics=True)),
        "with prometheus": KernelProc("rss1", echo_unit("echo", metrics=True), prometheus=True),
    }
    try:
        for k in kernels.values():
            k.start()
        for k in kernels.values():
            await asyncio.to_thread(k.ready, 1)
        for k in kernels.values():
            async with grpc.aio.insecure_channel(k.address, options=PLAIN) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)
                for _ in range(calls):
                    await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=30)
        for _ in range(scrapes):
            await asyncio.to_thread(kernels["with prometheus"].scrape)
        await asyncio.sleep(1.0)
        out = {name: k.rss() for name, k in kernels.items()}
    finally:
        for k in kernels.values():
            k.stop()
    print("  kernel RSS: " + ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in out.items()))
    return out


# -- report -------------------------------------------------------------------------


def report(
    thr: tuple[dict[str, dict[str, dict[str, float]]], int | None],
    scrape: dict[str, Any],
    rss: dict[str, int],
    args: Any,
    argv: list[str],
    took: float,
) -> str:
    v = versions("hsu", "grpcio", "prometheus-client", "opentelemetry-sdk")
    cmd = " ".join(["python bench/metrics.py", *argv])
    rates, spans, costs = thr
    lines = [
        HEADING,
        "",
        f"`{cmd}` (or `nox -s bench`), {datetime.date.today().isoformat()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" hsu {v['hsu']}, grpcio {v['grpcio']}, prometheus-client"
        f" {v['prometheus-client']}, opentelemetry-sdk {v['opentelemetry-sdk']};"
        f" {took:.0f} s. The machine is shared: other agents' builds and tests ran"
        f" beside it (1-minute load average {LOAD[0]:.1f} at the start, {LOAD[-1]:.1f} at"
        " the end, on 2 cores), so a window's rate moves by tens of per cent from one"
        " to the next, in either direction; the per-call pieces timed alone below are"
        " the steadier figures.",
        "",
        f"**Throughput, metrics on against off.** `Echo` with no delay, {args.inflight}"
        " calls in flight, one echo instance per kernel. *off*: `kernel.metrics: false`"
        " and `HSU_METRICS=0` for the HSU and the client (nothing counted); *on*: the"
        " defaults (the gateway, the HSU and `hsu.connect` each count every call under"
        " go-grpc-prometheus's names); *off, a second kernel*: another kernel and HSU"
        " configured exactly as *off* (an A/A control: what two processes differ by"
        " with nothing changed); *on + traceparent*: the same kernel as *on*, every call"
        " carrying a sampled W3C `traceparent` (the kernel's span, its pick and attempt"
        " spans and the HSU's span, the attempt's child, are made and propagated, not"
        " exported)",
    ]
    if spans is not None:
        lines[-1] += (
            "; *on + traceparent + otel*: a third kernel with `kernel.exporters: [otel]`"
            " (contrib/hsu-plugin-otel) sending the kernel's spans of every call (the"
            " call's, its pick's and its attempt's) over"
            " OTLP/gRPC to a discarding receiver in a process of its own"
            f" ({spans} spans received; the echo HSU exports none of its own)"
        )
    lines[-1] += (
        ". Each round runs the variants back to back (rotating which goes first),"
        f" {args.seconds:g} s each; {args.rounds} rounds per path. *CPU/call*: CPU time"
        " of the kernel and its HSU over the window, per call. Rates and CPU are medians"
        " over the rounds; the ratios are medians of each round's ratio to *off*."
    )
    lines += [
        "",
        "| path | variant | calls/s | vs off | CPU/call (kernel + HSU) | vs off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path, by_variant in rates.items():
        for variant, d in by_variant.items():
            vs_rate = "-" if variant == "off" else f"{d['rate/off']:.3f}x"
            vs_cpu = "-" if variant == "off" else f"{d['cpu/off']:.3f}x"
            lines.append(
                f"| {path} | {variant} | {d['rate']:.0f} | {vs_rate}"
                f" | {d['cpu'] * 1e6:.0f} us | {vs_cpu} |"
            )
    base = rates["gateway"]["off"]["cpu"]
    lines += [
        "",
        "**What they add per call, measured alone.** The throughput windows above"
        " cannot resolve a few per cent on this machine, so the pieces were also timed"
        " alone in one process (best of 5 runs of 20,000), and compared with the CPU a"
        f" routed call costs the kernel and its HSU without metrics ({base * 1e6:.0f} us,"
        " *gateway, off* above):",
        "",
        "| piece | per call | share of a routed call's CPU |",
        "| --- | --- | --- |",
        f"| counting (`CallMetrics.observe`), x2: gateway and HSU | {2 * costs['count'] * 1e6:.2f}"
        f" us | {2 * costs['count'] / base * 100:.2f} % |",
        f"| the kernel's span from the caller's `traceparent` | {costs['trace'] * 1e6:.2f} us"
        f" | {costs['trace'] / base * 100:.2f} % |",
        f"| a sampled call's parts recorded (`CallTrace`: a pick, an attempt and its"
        f" `traceparent`) | {costs['parts'] * 1e6:.2f} us | {costs['parts'] / base * 100:.2f} % |",
        f"| the parts as `CallSpan` records (only with an `hsu_routed_call` plugin)"
        f" | {costs['records'] * 1e6:.2f} us | {costs['records'] / base * 100:.2f} % |",
    ]
    if "otel" in costs:
        lines.append(
            f"| the otel exporter's span record (`span_of`) | {costs['otel'] * 1e6:.2f} us"
            f" | {costs['otel'] / base * 100:.2f} % |"
        )
        lines.append(
            f"| the otel exporter's records of the two parts (`part_of`)"
            f" | {costs['otel parts'] * 1e6:.2f} us | {costs['otel parts'] / base * 100:.2f} % |"
        )
        lines.append(
            f"| OTLP's encoding of the call's span (the exporter's thread)"
            f" | {costs['encode'] * 1e6:.2f} us | {costs['encode'] / base * 100:.2f} % |"
        )
        lines.append(
            f"| OTLP's encoding of its two parts' spans"
            f" | {costs['encode parts'] * 1e6:.2f} us"
            f" | {costs['encode parts'] / base * 100:.2f} % |"
        )
    share = 2 * costs["count"] / base * 100
    lines += [
        "",
        "The HSU's counting interceptor adds a coroutine frame per call beside"
        " `observe`; the SDK's batch export runs on its own thread.",
        "",
        f"Against the target (metrics on at most 3 % below off): counting is {share:.2f} %"
        f" of a routed call's CPU, {'within' if share <= 3 else 'over'} it; the windows'"
        " medians of the per-round ratio *on / off* were"
        f" {rates['gateway']['on']['rate/off']:.3f}x (gateway) and"
        f" {rates['hsu.connect']['on']['rate/off']:.3f}x (hsu.connect), which this"
        " machine's noise does not resolve to 3 %.",
    ]
    lines += [
        "",
        f"**A scrape with {scrape['instances']} instances.** One kernel with"
        f" {scrape['instances']} instances of a `sleep 1e6` unit (`kind: managed`: a"
        " process each, no gRPC, so no HSU is asked for its own metrics) and"
        " `kernel.exporters: [prometheus]`; each scrape reads every instance's state,"
        " restarts, uptime, RSS and CPU (from /proc) and renders the page."
        f" {args.scrapes} scrapes after a first one. RSS and CPU are read on a worker"
        " thread; *Kernel.Status during the scrapes*: another thread asked the kernel's"
        " control plane for its status over and over while each scrape ran, and timed"
        " each answer (what a scrape costs everything else on the kernel's event loop).",
        "",
        "| instances | scrape, median | scrape, max | page size | kernel RSS"
        " | Kernel.Status during the scrapes, median / max |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {scrape['instances']} | {scrape['median'] * 1000:.0f} ms"
        f" | {scrape['max'] * 1000:.0f} ms | {scrape['size'] / 1024:.0f} KiB"
        f" | {scrape['rss'] / 2**20:.1f} MiB | {scrape['status_median'] * 1000:.1f} ms"
        f" / {scrape['status_max'] * 1000:.0f} ms |",
        "",
        "**Kernel RSS with the prometheus exporter against without.** Two kernels with"
        f" one echo instance each, {args.calls} calls through each gateway; the one with"
        f" `kernel.exporters: [prometheus]` scraped {args.scrapes} times (prometheus-client"
        " is imported only when the exporter starts). RSS of each kernel process.",
        "",
        "| kernel | RSS |",
        "| --- | --- |",
    ]
    for name, value in rss.items():
        lines.append(f"| {name} | {value / 2**20:.1f} MiB |")
    diff = rss["with prometheus"] - rss["without"]
    lines += ["", f"The exporter's cost: {diff / 2**20:+.1f} MiB.", ""]
    return "\n".join(lines)


async def parts(args: Any) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """All parts on one event loop (grpc.aio keeps state per loop)."""
    print(f"1. throughput, {args.inflight} in flight, metrics on against off", flush=True)
    thr = await bench_throughput(args.inflight, args.rounds, args.seconds)
    thr = (*thr, microcosts())
    print(f"2. a scrape with {args.instances} instances", flush=True)
    scrape = await asyncio.to_thread(bench_scrape, args.instances, args.scrapes)
    print("3. kernel RSS with the prometheus exporter against without", flush=True)
    rss = await bench_rss(args.scrapes, args.calls)
    return thr, scrape, rss


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inflight", type=int, default=32, help="calls in flight (default 32)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds, part 1 (default 20)")
    ap.add_argument("--seconds", type=float, default=0.5, help="s per window, part 1")
    ap.add_argument("--instances", type=int, default=1000, help="instances, part 2")
    ap.add_argument("--scrapes", type=int, default=5, help="scrapes, parts 2 and 3")
    ap.add_argument("--calls", type=int, default=200, help="calls per kernel, part 3")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    args = ap.parse_args(argv)
    if min(args.inflight, args.rounds, args.instances, args.scrapes, args.calls) < 1:
        ap.error("counts must be >= 1")
    if args.seconds <= 0:
        ap.error("--seconds must be > 0")
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    LOAD.append(os.getloadavg()[0])
    failed: BaseException | None = None
    try:
        thr, scrape, rss = asyncio.run(parts(args))
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    LOAD.append(os.getloadavg()[0])
    body = report(thr, scrape, rss, args, argv, time.monotonic() - started)
    print()
    print(body)
    print(f"no process left behind ({len(TRACKER.seen)} tracked)")
    if not args.no_write:
        write_section(body, HEADING)
        print(f"wrote the {HEADING!r} section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
