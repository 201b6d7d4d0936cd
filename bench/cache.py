"""Response-cache benchmark: cached routed calls against uncached ones to the
same HSU.

Run with ``python bench/cache.py`` (hsu and hsu-echo installed). One kernel
runs as ``python -m hsu run`` in a temp dir with one ``python -m hsu_echo``
instance whose unit declares ``routing.cache: {methods: [Echo], ttl: 5m}``
(the kernel's layers: the built-in ``memory``); this process is the client.
Side by side, in rotating rounds, with ``--inflight`` calls at a time:

- **hit**: the same request every call, answered from the cache (the
  gateway's layers, or ``hsu.connect``'s own per-channel cache) without
  reaching the HSU;
- **miss**: a new request every call (``Echo`` with a counter in its
  message), so every call goes to the HSU and its reply is then kept: the
  uncached path plus the cache's cost on a miss;

each through the gateway (a plain grpc.aio stub on the kernel's address) and
through ``hsu.connect``. It reports calls/s and the median and p99 latency
of each, and the hit/miss ratio of both.

It prints the results and replaces the ``## Response cache`` section of
``docs/benchmarks.md`` unless ``--no-write``. Everything listens on
127.0.0.1 or a unix socket in the temp dir; the kernel is stopped by pid and
the run fails if any process it started is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
from _common import DOC, RUN_MARK, TRACKER, interrupted, reap_leftovers, versions, write_section

import hsu
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

HEADING = "## Response cache"
UNIT = "lookup"
INTERFACE = "hsu.echo.v1.Echo"
PLAIN = (("grpc.enable_http_proxy", 0),)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KernelProc:
    """``python -m hsu run`` on one cached echo unit, in a temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hb-cache-"))
        self.address = f"127.0.0.1:{free_port()}"
        self.control = f"unix:{self.dir}/control.sock"
        (self.dir / "deployment.yaml").write_text(
            textwrap.dedent(f"""\
            name: bench-cache
            kernel:
              address: {self.address}
              control: {self.control}
              drain_grace: 1
            units:
              {UNIT}:
                command: [python, -m, hsu_echo]
                interfaces: [{INTERFACE}]
                start: at-start
                startup_timeout: 30
                stop_grace: 2
                routing:
                  cache: {{methods: [Echo], ttl: 5m}}
            """)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
        env["HSU_BENCH_RUN"] = RUN_MARK
        out = open(self.dir / "kernel.out", "wb")  # noqa: SIM115 - the child keeps it
        self.hsu_pid = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hsu", "run", "deployment.yaml"],
            cwd=self.dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        out.close()
        TRACKER.add([self.proc.pid])

    def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.control, options=PLAIN) as ch:
            stub = kernel_pb2_grpc.KernelStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the kernel exited: {(self.dir / 'kernel.out').read_text()}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    insts = stub.ListInstances(
                        kernel_pb2.ListInstancesRequest(unit=UNIT), timeout=2
                    ).instances
                    TRACKER.add(i.pid for i in insts if i.pid)
                    ready = [i for i in insts if i.state == "ready"]
                    if ready:
                        self.hsu_pid = ready[0].pid
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError("the kernel's instance was not ready in time")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


async def run_round(stub: Any, hit: bool, calls: int, inflight: int, seq: Any) -> list[float]:
    """``calls`` calls, ``inflight`` at a time; each call's latency (s)."""
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            message = "hello" if hit else f"m{next(seq)}"
            t0 = time.perf_counter()
            await stub.Echo(echo_pb2.EchoRequest(message=message), timeout=10)
            latencies.append(time.perf_counter() - t0)

    share = [calls // inflight + (i < calls % inflight) for i in range(inflight)]
    await asyncio.gather(*(worker(n) for n in share))
    return latencies


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def measure(
    kernel: KernelProc, rounds: int, calls: int, inflight: int, seq: Iterator[int]
) -> dict[str, Any]:
    """``seq`` numbers the misses' requests: one counter for the whole run, so
    no miss repeats an earlier request (the cache keeps them for 5 minutes)."""
    pids = (kernel.proc.pid, kernel.hsu_pid)
    results: dict[str, dict[str, Any]] = {}
    async with (
        grpc.aio.insecure_channel(kernel.address, options=PLAIN) as gw_channel,
        hsu.connect(kernel.control) as routed,
    ):
        stubs = {
            "gateway": echo_pb2_grpc.EchoStub(gw_channel),
            "hsu.connect": echo_pb2_grpc.EchoStub(routed),
        }
        # warm up: channels, the route, the gateway's reflection of Echo's kind
        for stub in stubs.values():
            for _ in range(50):
                await stub.Echo(echo_pb2.EchoRequest(message="hello"), timeout=10)
                await stub.Echo(echo_pb2.EchoRequest(message=f"m{next(seq)}"), timeout=10)
            await asyncio.sleep(0.2)
        kinds = [(path, hit) for path in stubs for hit in (True, False)]
        for r in range(rounds):
            order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for path, hit in order:
                key = f"{path} {'hit' if hit else 'miss'}"
                cpu0 = [cpu(p) for p in pids]
                t0 = time.perf_counter()
                lat = await run_round(stubs[path], hit, calls, inflight, seq)
                wall = time.perf_counter() - t0
                cpu1 = [cpu(p) for p in pids]
                entry = results.setdefault(
                    key, {"lat": [], "wall": 0.0, "n": 0, "kcpu": 0.0, "hcpu": 0.0}
                )
                entry["lat"].extend(lat)
                entry["wall"] += wall
                entry["n"] += len(lat)
                entry["kcpu"] += cpu1[0] - cpu0[0]
                entry["hcpu"] += cpu1[1] - cpu0[1]
    out = {}
    for key, e in results.items():
        lat = sorted(e["lat"])
        out[key] = {
            "calls_s": e["n"] / e["wall"],
            "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "kernel_us": e["kcpu"] / e["n"] * 1e6,
            "hsu_us": e["hcpu"] / e["n"] * 1e6,
        }
    return out


def report(
    results: dict[int, dict[str, Any]], args: argparse.Namespace, load: tuple[float, float]
) -> str:
    v = versions("hsu", "grpcio")
    lines = [
        HEADING,
        "",
        f"`python bench/cache.py --rounds {args.rounds} --calls {args.calls}"
        f" --inflight {' '.join(map(str, args.inflight))}` (in `nox -s bench`),"
        f" {datetime.date.today().isoformat()}, {platform.machine()} with"
        f" {psutil.cpu_count()} CPUs, Python {platform.python_version()}, grpcio"
        f" {v['grpcio']}. The machine is shared with other work (1-minute load"
        f" average {load[0]:.1f} before the run, {load[1]:.1f} after): compare the"
        " rows with each other (measured side by side in rotating rounds), not"
        " with other runs; with more runnable processes than CPUs the ratios"
        " move from run to run.",
        "",
        "One `python -m hsu_echo` instance behind one kernel whose unit caches"
        " `Echo` (`routing.cache: {methods: [Echo], ttl: 5m}`, the kernel's"
        " `memory` layer). **hit**: the same request every call, answered from"
        " the cache (the gateway's layers; `hsu.connect`'s own cache, in this"
        " process) without reaching the HSU. **miss**: a new request every"
        " call, forwarded to the HSU and its reply kept: the uncached call plus"
        " the cache's cost on a miss. CPU per call is the kernel's and the"
        " HSU's process (user + system) over the rounds; this client's own is"
        " not counted. `hsu.connect` calls resolve in the kernel once, then go"
        " straight to the instance: the kernel spends nothing on them.",
        "",
    ]
    for inflight, res in results.items():
        lines += [
            f"{inflight} call(s) in flight:",
            "",
            "| path | calls/s | p50 ms | p99 ms | kernel CPU µs/call | HSU CPU µs/call |"
            " hit/miss calls/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for path in ("gateway", "hsu.connect"):
            hit, miss = res[f"{path} hit"], res[f"{path} miss"]
            ratio = hit["calls_s"] / miss["calls_s"]
            for kind, r in (("hit", hit), ("miss", miss)):
                lines.append(
                    f"| {path} {kind} | {r['calls_s']:,.0f} | {r['p50_ms']:.3f} |"
                    f" {r['p99_ms']:.3f} | {r['kernel_us']:,.0f} | {r['hsu_us']:,.0f} |"
                    f" {f'{ratio:.1f}x' if kind == 'hit' else ''} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    load_before = os.getloadavg()[0]
    kernel = KernelProc()
    try:
        kernel.ready()
        seq = itertools.count()
        results = {
            n: asyncio.run(measure(kernel, args.rounds, args.calls, n, seq)) for n in args.inflight
        }
    finally:
        kernel.stop()
    reap_leftovers()
    text = report(results, args, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(text, HEADING, DOC)


if __name__ == "__main__":
    main()
