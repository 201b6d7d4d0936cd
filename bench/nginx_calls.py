"""What nginx's call log costs: routed throughput through the nginx data
plane with ``gateway_nginx.call_log`` on and off, side by side (not part of
``nox -s bench``).

``python bench/nginx_calls.py`` (nginx on PATH: ``apt-get install
nginx-light``) starts two kernels (``python -m hsu run``), each with one echo
instance and nginx on a port of its own, one with the call log on (the
default) and one with it off. It then calls ``Echo`` through each nginx with
1 and 32 calls in flight, alternating which goes first, ``--rounds`` rounds
of ``--seconds`` each, and prints per round calls/s and the CPU the kernel
and nginx spent per call (their processes' user+system time over the round),
then the medians. At the end it checks that the logging kernel counted every
call nginx routed (``grpc_server_handled_total`` over the Kernel API's
Core.Metrics) and reports ``hsu_nginx_call_log_lost_total``. Every process it
starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import psutil
from _common import TRACKER, leftovers
from routing import PLAIN_OPTIONS, KernelProc

from hsu._kernel.core_service import families_from_pb
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class LoggingKernel(KernelProc):
    def __init__(self, tag: str, call_log: bool):
        super().__init__(tag, start="at-start", min_instances=1, nginx=True)
        self.call_log = call_log

    def deployment(self) -> str:
        text = super().deployment()
        flag = "true" if self.call_log else "false"
        return text.replace(
            f"gateway_nginx: {{address: {self.nginx}}}",
            f"gateway_nginx: {{address: {self.nginx}, call_log: {flag}}}",
        )

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the kernel and of nginx (master and workers)."""
        assert self.proc is not None
        return _cpu([self.proc.pid]), _cpu(self.nginx_pids())

    def counted(self) -> tuple[float, float]:
        """The kernel's own grpc_server_handled_total for Echo, and the lost lines."""
        assert self.channel is not None
        reply = core_pb2_grpc.CoreStub(self.channel).Metrics(core_pb2.MetricsRequest(), timeout=10)
        handled = lost = 0.0
        for fam in families_from_pb(reply):
            for p in fam.points:
                labels = dict(p.labels)
                if fam.name == "grpc_server_handled_total" and "hsu_instance" not in labels:
                    handled += p.value if labels.get("grpc_method") == "Echo" else 0
                if fam.name == "hsu_nginx_call_log_lost_total":
                    lost += p.value
        return handled, lost


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


async def run(address: str, inflight: int, seconds: float) -> int:
    """Calls that completed with ``inflight`` tasks calling Echo for ``seconds``."""
    async with grpc.aio.insecure_channel(address, options=PLAIN_OPTIONS) as channel:
        echo = echo_pb2_grpc.EchoStub(channel).Echo
        for _ in range(20):
            await echo(echo_pb2.EchoRequest(message="warm"), timeout=10)
        done = 0
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await echo(echo_pb2.EchoRequest(message="x"), timeout=10)
                done += 1

        await asyncio.gather(*(caller() for _ in range(inflight)))
        return done + 20


def per_line() -> tuple[float, float]:
    """Microseconds the kernel spends on one line (parse, count), in process:
    a kernel that is built, not started; without and with a traceparent."""
    import tempfile
    import timeit

    from hsu.testing import build_kernel
    from hsu.tracecontext import SpanContext
    from hsu_plugins.gateway.nginx_calls import CallLog

    with tempfile.TemporaryDirectory() as tmp:
        kernel = build_kernel({"units": {}}, base_dir=tmp)
    log = CallLog(kernel)
    log.units.add("echo")
    log.kinds["/hsu.echo.v1.Echo/Echo"] = "unary"
    from hsu_plugins.gateway.nginx_calls import FIELDS

    fields = {
        "method": "/hsu.echo.v1.Echo/Echo", "unit": "echo", "status": "200", "trailer": "0",
        "took": "0.001", "end": "1764650000.123", "address": "127.0.0.1:40000",
    }  # fmt: skip

    def line() -> bytes:
        values = [fields.get(name, "") for name, _ in FIELDS]
        return "\t".join([f"<190>Dec  2 05:19:12 hsu: {log.token}", *values]).encode()

    plain = line()
    fields["traceparent"] = SpanContext.new().traceparent
    traced = line()
    out = []
    for data in (plain, traced):
        n = 20_000
        out.append(min(timeit.repeat(lambda d=data: log.take(d), number=n, repeat=15)) / n * 1e6)
    return out[0], out[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    plain, traced = per_line()
    print(f"the kernel's work per line (parse, count): {plain:.1f} us", end="")
    print(f"; with a traceparent {traced:.1f} us")
    on, off = LoggingKernel("log-on", True), LoggingKernel("log-off", False)
    made = {True: 0, False: 0}
    rows: dict[tuple[bool, int], list[tuple[float, float, float]]] = {}
    try:
        for k in (on, off):
            k.start()
            k.wait_running()
            inst = k.wait_ready()
            k.wait_nginx_routes(inst.address)
            TRACKER.add(k.nginx_pids())
        print(f"load average before: {os.getloadavg()}")
        for r in range(args.rounds):
            for inflight in (1, 32):
                order = (on, off) if r % 2 == 0 else (off, on)
                for k in order:
                    cpu0, wall0 = k.cpu(), time.monotonic()
                    calls = asyncio.run(run(k.nginx, inflight, args.seconds))
                    wall = time.monotonic() - wall0
                    cpu1 = k.cpu()
                    made[k.call_log] += calls
                    kernel_us = (cpu1[0] - cpu0[0]) / calls * 1e6
                    nginx_us = (cpu1[1] - cpu0[1]) / calls * 1e6
                    row = (calls / wall, kernel_us, nginx_us)
                    rows.setdefault((k.call_log, inflight), []).append(row)
                    state = "on " if k.call_log else "off"
                    print(
                        f"round {r + 1} inflight {inflight:2d} call_log {state}:"
                        f" {row[0]:7.0f} calls/s, kernel {kernel_us:5.1f} us/call,"
                        f" nginx {nginx_us:5.1f} us/call"
                    )
        print(f"load average after: {os.getloadavg()}")
        print("\nmedians (calls/s; kernel CPU us/call; nginx CPU us/call):")
        for inflight in (1, 32):
            med = {
                log: [statistics.median(x[i] for x in rows[log, inflight]) for i in range(3)]
                for log in (True, False)
            }
            ratios = [
                a[0] / b[0]
                for a, b in zip(rows[True, inflight], rows[False, inflight], strict=True)
            ]
            print(
                f"  inflight {inflight:2d}: on {med[True][0]:.0f} / off {med[False][0]:.0f}"
                f" calls/s (per-round on/off: median {statistics.median(ratios):.3f}x,"
                f" {min(ratios):.2f}-{max(ratios):.2f});"
                f" kernel {med[True][1]:.1f} vs {med[False][1]:.1f} us/call;"
                f" nginx {med[True][2]:.1f} vs {med[False][2]:.1f} us/call"
            )
        time.sleep(0.5)
        handled, lost = on.counted()
        print(
            f"\ncall log on: nginx routed {made[True]} calls, the kernel counted {handled:.0f};"
            f" lost lines (receive queue full): {lost:.0f}"
        )
        off_handled, _ = off.counted()
        print(f"call log off: the kernel counted {off_handled:.0f} of {made[False]}")
    finally:
        for k in (on, off):
            k.stop()
    left = leftovers()
    if left:
        print(f"left alive: {[p.pid for p in left]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
