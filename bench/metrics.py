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
   ``traceparent`` (the gateway makes a span of its own and forwards it; the
   SDK serves the call under a child span; no exporter). Through the gateway
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
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import psutil
from _common import DOC, ROOT, RUN_MARK, TRACKER, interrupted, leftovers, versions, write_section

import hsu
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.tracecontext import SpanContext
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

HEADING = "## Observability"
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

    def __init__(self, tag: str, unit: str, *, metrics: bool = True, prometheus: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix=f"hb-metrics-{tag}-"))
        self.address = f"127.0.0.1:{free_port()}"
        self.control = f"unix:{self.dir}/control.sock"
        self.metrics_address = f"127.0.0.1:{free_port()}" if prometheus else ""
        exporters = "[prometheus]" if prometheus else "[]"
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


async def window(stub: Any, inflight: int, seconds: float, traced: bool) -> float:
    """Calls per second with ``inflight`` callers for ``seconds``; ``traced``:
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

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done / (time.perf_counter() - t)


VARIANTS = ("off", "on", "on + traceparent")


async def bench_throughput(
    inflight: int, rounds: int, seconds: float
) -> dict[str, dict[str, float]]:
    kernels = {
        "on": KernelProc("on", echo_unit("echo", metrics=True), metrics=True),
        "off": KernelProc("off", echo_unit("echo", metrics=False), metrics=False),
    }
    try:
        for k in kernels.values():
            k.start()
        for k in kernels.values():
            await asyncio.to_thread(k.ready, 1)
        opened: list[Any] = []
        stubs: dict[tuple[str, str], Any] = {}
        try:
            for name, k in kernels.items():
                # hsu.connect reads HSU_METRICS when it is made: off counts nothing
                if name == "off":
                    os.environ["HSU_METRICS"] = "0"
                try:
                    routed = hsu.connect(k.control)
                finally:
                    os.environ.pop("HSU_METRICS", None)
                plain = grpc.aio.insecure_channel(k.address, options=PLAIN)
                opened += [routed, plain]
                stubs["hsu.connect", name] = echo_pb2_grpc.EchoStub(routed)
                stubs["gateway", name] = echo_pb2_grpc.EchoStub(plain)
            cases = [(path, variant) for path in ("gateway", "hsu.connect") for variant in VARIANTS]
            raw: dict[tuple[str, str], list[float]] = {c: [] for c in cases}

            def stub_of(path: str, variant: str) -> Any:
                return stubs[path, "off" if variant == "off" else "on"]

            for path, variant in cases:  # warm up
                await window(stub_of(path, variant), inflight, 0.3, "traceparent" in variant)
            for r in range(rounds):
                for path in ("gateway", "hsu.connect"):
                    order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
                    for variant in order:
                        rate = await window(
                            stub_of(path, variant), inflight, seconds, "traceparent" in variant
                        )
                        raw[path, variant].append(rate)
        finally:
            for c in opened:
                await c.close()
    finally:
        for k in kernels.values():
            k.stop()
    # each round's ratios (its three windows ran back to back, so a change
    # in the machine's load between rounds cancels out), then their median
    result: dict[str, dict[str, float]] = {}
    for path in ("gateway", "hsu.connect"):
        off = raw[path, "off"]
        d = result[path] = {v: statistics.median(raw[path, v]) for v in VARIANTS}
        d["on/off"] = statistics.median(a / b for a, b in zip(raw[path, "on"], off, strict=True))
        d["traced/off"] = statistics.median(
            a / b for a, b in zip(raw[path, "on + traceparent"], off, strict=True)
        )
        print(
            f"  {path}: "
            + ", ".join(f"{v} {d[v]:.0f}/s" for v in VARIANTS)
            + f"; on/off {d['on/off']:.3f}, traced/off {d['traced/off']:.3f}"
        )
    return result


# -- 2. a scrape with many instances -----------------------------------------------


def bench_scrape(instances: int, scrapes: int) -> dict[str, Any]:
    k = KernelProc("scrape", sleep_unit(instances), prometheus=True)
    try:
        k.start()
        t = time.monotonic()
        k.ready(instances, timeout=max(120.0, instances * 0.5))
        started = time.monotonic() - t
        k.scrape()  # the first: the sampler's first reading of every process
        times, sizes = [], []
        for _ in range(scrapes):
            took, size = k.scrape()
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
    }
    print(
        f"  {instances} instances: scrape median {out['median'] * 1000:.0f} ms"
        f" (max {out['max'] * 1000:.0f} ms), {out['size'] / 1024:.0f} KiB"
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
    thr: dict[str, dict[str, float]],
    scrape: dict[str, Any],
    rss: dict[str, int],
    args: Any,
    argv: list[str],
    took: float,
) -> str:
    v = versions("hsu", "grpcio", "prometheus-client")
    cmd = " ".join(["python bench/metrics.py", *argv])
    lines = [
        HEADING,
        "",
        f"`{cmd}`, {datetime.date.today().isoformat()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" hsu {v['hsu']}, grpcio {v['grpcio']}, prometheus-client"
        f" {v['prometheus-client']}; {took:.0f} s. The machine is shared: other work ran"
        " beside it, so single figures move by several per cent from run to run.",
        "",
        f"**Throughput, metrics on against off.** `Echo` with no delay, {args.inflight}"
        " calls in flight, one echo instance per kernel. *off*: `kernel.metrics: false`"
        " and `HSU_METRICS=0` for the HSU and the client (nothing counted); *on*: the"
        " defaults (the gateway, the HSU and `hsu.connect` each count every call under"
        " go-grpc-prometheus's names); *on + traceparent*: the same kernel, every call"
        " carrying a sampled W3C `traceparent` (the kernel's span and the HSU's child"
        " span are made and propagated; no exporter sends them anywhere). Each round"
        f" runs the three back to back (rotating which goes first) for {args.seconds:g} s"
        f" each; {args.rounds} rounds per path. The rates are medians over the rounds,"
        " the ratios medians of each round's ratio.",
        "",
        "| path | off | on | on / off | on + traceparent | traced / off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path, d in thr.items():
        off, on, tr = d["off"], d["on"], d["on + traceparent"]
        lines.append(
            f"| {path} | {off:.0f} calls/s | {on:.0f} calls/s | {d['on/off']:.3f}x"
            f" | {tr:.0f} calls/s | {d['traced/off']:.3f}x |"
        )
    lines += [
        "",
        f"**A scrape with {scrape['instances']} instances.** One kernel with"
        f" {scrape['instances']} instances of a `sleep 1e6` unit (`kind: managed`: a"
        " process each, no gRPC, so no HSU is asked for its own metrics) and"
        " `kernel.exporters: [prometheus]`; each scrape reads every instance's state,"
        " restarts, uptime, RSS and CPU (from /proc) and renders the page."
        f" {args.scrapes} scrapes after a first one.",
        "",
        "| instances | scrape, median | scrape, max | page size | kernel RSS |",
        "| --- | --- | --- | --- | --- |",
        f"| {scrape['instances']} | {scrape['median'] * 1000:.0f} ms"
        f" | {scrape['max'] * 1000:.0f} ms | {scrape['size'] / 1024:.0f} KiB"
        f" | {scrape['rss'] / 2**20:.1f} MiB |",
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


async def parts(args: Any) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, int]]:
    """All parts on one event loop (grpc.aio keeps state per loop)."""
    print(f"1. throughput, {args.inflight} in flight, metrics on against off", flush=True)
    thr = await bench_throughput(args.inflight, args.rounds, args.seconds)
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
    failed: BaseException | None = None
    try:
        thr, scrape, rss = asyncio.run(parts(args))
    except BaseException as exc:
        failed = exc
        raise
    finally:
        left = leftovers()
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if left:
            msg = f"LEAKED PROCESSES (now SIGKILLed): {', '.join(str(p.pid) for p in left)}"
            print(msg, file=sys.stderr)
            if failed is None:
                raise SystemExit(msg)
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
