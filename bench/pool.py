"""Worker-pool benchmark: jobs on instances that take one call at a time.

Run with ``python bench/pool.py`` (hsu and hsu-echo installed). Kernels run
as ``python -m hsu run`` in temp dirs; this process is the client. One run
measures, side by side:

1. **Jobs.** ``--jobs`` jobs (``Echo`` with ``delay_ms: --job-ms``), all
   submitted at once, on a unit with ``max_inflight: 1``, for each instance
   count in ``--instances``: through ``hsu.connect`` (every job takes a slot
   from the kernel's queue, ``Kernel.Slots``), and through a plain
   ``asyncio.Semaphore`` of as many slots in front of plain grpc.aio
   channels straight to the same instances (the floor: no kernel in the
   path). Each is compared with the ideal, jobs x job time / instances. Then
   once with autoscaling from zero to the largest count (``min_instances:
   0``), where the starts are part of the time.
2. **Queue overhead with slots free.** ``Echo`` with no delay, ``--inflight``
   calls at a time, on two kernels with one instance each: one unit with
   ``max_inflight`` unset, one with ``max_inflight: 1000`` (never full), in
   rotating rounds, through ``hsu.connect`` and through the gateway (a plain
   stub on the kernel's address).

It prints the results and replaces the ``## Worker pool`` section of
``docs/benchmarks.md`` unless ``--no-write``. Everything listens on
127.0.0.1; every process it starts is stopped by pid and the run fails if any
is still alive at the end.
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
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
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
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

HEADING = "## Worker pool"
UNIT = "pool"
INTERFACE = "hsu.echo.v1.Echo"
PLAIN = (("grpc.enable_http_proxy", 0),)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env["HSU_BENCH_RUN"] = RUN_MARK
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KernelProc:
    """``python -m hsu run`` on a deployment of one echo unit, in a temp dir."""

    def __init__(self, tag: str, routing: str, *, start: str, min_i: int, max_i: int):
        self.dir = Path(tempfile.mkdtemp(prefix=f"hb-pool-{tag}-"))
        self.address = f"127.0.0.1:{free_port()}"
        self.control = f"unix:{self.dir}/control.sock"
        self.text = textwrap.dedent(f"""\
            name: bench-pool
            kernel:
              address: {self.address}
              control: {self.control}
              drain_grace: 1
            units:
              {UNIT}:
                command: [python, -m, hsu_echo]
                interfaces: [{INTERFACE}]
                start: {start}
                min_instances: {min_i}
                max_instances: {max_i}
                startup_timeout: 30
                stop_grace: 2
                routing: {routing}
            """)
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

    def ready(self, count: int, timeout: float = 60.0) -> list[Any]:
        """Wait until ``count`` instances are ready (0: until the kernel runs)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the kernel exited:\n{self.tail()}")
            with contextlib.suppress(grpc.RpcError):
                if self.stub.Status(kernel_pb2.StatusRequest(), timeout=1).state == "running":
                    insts = self.stub.ListInstances(
                        kernel_pb2.ListInstancesRequest(unit=UNIT), timeout=5
                    ).instances
                    ready = [i for i in insts if i.state == "ready" and i.address]
                    TRACKER.add(i.pid for i in insts if i.pid)
                    if len(ready) >= count:
                        return ready
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} instances not ready in {timeout:g}s:\n{self.tail()}")
            time.sleep(0.05)

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
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- 1. jobs ------------------------------------------------------------------------


async def jobs_routed(control: str, jobs: int, job_ms: int) -> float:
    async with hsu.connect(control) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await stub.Echo(echo_pb2.EchoRequest(message="warm"), timeout=60)
        req = echo_pb2.EchoRequest(message="job", delay_ms=job_ms)
        t = time.perf_counter()
        await asyncio.gather(*(stub.Echo(req, timeout=600) for _ in range(jobs)))
        return time.perf_counter() - t


async def jobs_floor(addresses: list[str], jobs: int, job_ms: int) -> float:
    """A plain asyncio.Semaphore of one slot per instance, and a free list."""
    channels = [grpc.aio.insecure_channel(a, options=PLAIN) for a in addresses]
    try:
        free = [echo_pb2_grpc.EchoStub(c) for c in channels]
        for stub in free:
            await stub.Echo(echo_pb2.EchoRequest(message="warm"), timeout=60)
        sem = asyncio.Semaphore(len(free))
        req = echo_pb2.EchoRequest(message="job", delay_ms=job_ms)

        async def job() -> None:
            async with sem:
                stub = free.pop()
                try:
                    await stub.Echo(req, timeout=600)
                finally:
                    free.append(stub)

        t = time.perf_counter()
        await asyncio.gather(*(job() for _ in range(jobs)))
        return time.perf_counter() - t
    finally:
        for c in channels:
            await c.close()


async def bench_jobs(counts: list[int], jobs: int, job_ms: int) -> list[dict[str, Any]]:
    rows = []
    for n in counts:
        k = KernelProc(f"j{n}", "{max_inflight: 1}", start="at-start", min_i=n, max_i=n)
        try:
            k.start()
            ready = await asyncio.to_thread(k.ready, n)
            floor = await jobs_floor([i.address for i in ready], jobs, job_ms)
            routed = await jobs_routed(k.control, jobs, job_ms)
        finally:
            k.stop()
        ideal = jobs * job_ms / 1000 / n
        rows.append({"instances": n, "ideal": ideal, "floor": floor, "routed": routed})
        print(f"  {n} instance(s): ideal {ideal:.2f}s floor {floor:.2f}s hsu {routed:.2f}s")
    top = max(counts)
    auto = KernelProc(
        "auto",
        "{max_inflight: 1, autoscale: {interval: 0.1, cooldown: 5}}",
        start="on-demand",
        min_i=0,
        max_i=top,
    )
    try:
        auto.start()
        await asyncio.to_thread(auto.ready, 0)

        async def from_zero() -> float:
            async with hsu.connect(auto.control) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)
                req = echo_pb2.EchoRequest(message="job", delay_ms=job_ms)
                t = time.perf_counter()
                await asyncio.gather(*(stub.Echo(req, timeout=600) for _ in range(jobs)))
                return time.perf_counter() - t

        took = await from_zero()
        peak = len(await asyncio.to_thread(auto.ready, 0))
    finally:
        auto.stop()
    ideal = jobs * job_ms / 1000 / top
    rows.append({"instances": f"0..{top} (autoscaled; {peak} at the end)", "ideal": ideal,
                 "floor": float("nan"), "routed": took})  # fmt: skip
    print(f"  autoscaled 0..{top}: ideal {ideal:.2f}s hsu {took:.2f}s ({peak} instances)")
    return rows


# -- 2. queue overhead with free slots ----------------------------------------------


async def window(stub: Any, inflight: int, seconds: float) -> float:
    """Calls per second with ``inflight`` callers for ``seconds``."""
    req = echo_pb2.EchoRequest(message="x")
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await stub.Echo(req, timeout=30)
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done / (time.perf_counter() - t)


async def bench_overhead(inflight: int, rounds: int, seconds: float) -> dict[str, dict[str, float]]:
    kernels = {
        "unset": KernelProc("free", "{}", start="at-start", min_i=1, max_i=1),
        "max_inflight 1000": KernelProc(
            "lim", "{max_inflight: 1000}", start="at-start", min_i=1, max_i=1
        ),
    }
    try:
        for k in kernels.values():
            k.start()
        for k in kernels.values():
            await asyncio.to_thread(k.ready, 1)

        async def run() -> dict[str, dict[str, list[float]]]:
            out: dict[str, dict[str, list[float]]] = {
                p: {v: [] for v in kernels} for p in ("hsu.connect", "gateway")
            }
            opened = []
            stubs: dict[tuple[str, str], Any] = {}
            for name, k in kernels.items():
                routed = hsu.connect(k.control)
                plain = grpc.aio.insecure_channel(k.address, options=PLAIN)
                opened += [routed, plain]
                stubs["hsu.connect", name] = echo_pb2_grpc.EchoStub(routed)
                stubs["gateway", name] = echo_pb2_grpc.EchoStub(plain)
            try:
                for stub in stubs.values():
                    await window(stub, inflight, 0.3)  # warm up
                order = list(stubs)
                for r in range(rounds):
                    for path, name in order[r % len(order) :] + order[: r % len(order)]:
                        rate = await window(stubs[path, name], inflight, seconds)
                        out[path][name].append(rate)
            finally:
                for c in opened:
                    await c.close()
            return out

        raw = await run()
    finally:
        for k in kernels.values():
            k.stop()
    result = {p: {v: statistics.median(xs) for v, xs in d.items()} for p, d in raw.items()}
    for p, d in result.items():
        print("  " + p + ": " + ", ".join(f"{v} {x:.0f}/s" for v, x in d.items()))
    return result


# -- report -------------------------------------------------------------------------


def report(jobs: list[dict[str, Any]], over: dict[str, dict[str, float]], args: Any,
           argv: list[str], took: float) -> str:  # fmt: skip
    v = versions("hsu", "grpcio")
    cmd = " ".join(["python bench/pool.py", *argv])
    lines = [
        HEADING,
        "",
        f"`{cmd}` (or `nox -s bench`), {datetime.date.today().isoformat()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" hsu {v['hsu']}, grpcio {v['grpcio']}; {took:.0f} s. The machine is shared:"
        " other work ran beside it.",
        "",
        f"**Jobs.** {args.jobs} jobs of {args.job_ms} ms (`Echo` with `delay_ms`), all"
        " submitted at once, on a unit with `max_inflight: 1`. *hsu*: `hsu.connect`, every"
        " job takes a slot from the kernel's queue (`Kernel.Slots`); *floor*: a plain"
        " `asyncio.Semaphore` with one slot per instance in front of plain grpc.aio"
        " channels straight to the same instances; *ideal*: jobs x job time / instances.",
        "",
        "| instances | ideal | floor | hsu | hsu / floor | hsu / ideal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in jobs:
        fl = r["floor"]
        ratio = "-" if fl != fl else f"{r['routed'] / fl:.3f}x"  # NaN: no floor
        fls = "-" if fl != fl else f"{fl:.2f} s"
        lines.append(
            f"| {r['instances']} | {r['ideal']:.2f} s | {fls} | {r['routed']:.2f} s | {ratio}"
            f" | {r['routed'] / r['ideal']:.3f}x |"
        )
    lines += [
        "",
        f"**Queue overhead with slots free.** `Echo` with no delay, {args.inflight} calls in"
        " flight, one instance; two kernels side by side, one unit with `max_inflight`"
        " unset and one with `max_inflight: 1000` (never full, so no call waits; the gateway"
        " takes and gives back a slot per call in the kernel, `hsu.connect` keeps the slot of"
        " its last call for the next, `SLOT_LINGER`, and asks the kernel only when it has"
        f" none); median of {args.rounds} rotating rounds of {args.seconds:g} s.",
        "",
        "| path | unset | max_inflight 1000 | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for path, d in over.items():
        a, b = d["unset"], d["max_inflight 1000"]
        lines.append(f"| {path} | {a:.0f} calls/s | {b:.0f} calls/s | {b / a:.3f}x |")
    lines.append("")
    return "\n".join(lines)


async def both(args: Any) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Both parts on one event loop (grpc.aio keeps state per loop)."""
    jobs = await bench_jobs(args.instances, args.jobs, args.job_ms)
    print(f"2. queue overhead, {args.inflight} in flight", flush=True)
    over = await bench_overhead(args.inflight, args.rounds, args.seconds)
    return jobs, over


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000, help="jobs per run (default 1000)")
    ap.add_argument("--job-ms", type=int, default=50, help="ms per job (default 50)")
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--inflight", type=int, default=32, help="calls in flight, part 2")
    ap.add_argument("--rounds", type=int, default=6, help="rounds, part 2 (default 6)")
    ap.add_argument("--seconds", type=float, default=1.0, help="s per window, part 2")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    args = ap.parse_args(argv)
    if min(args.jobs, args.job_ms, args.inflight, args.rounds, *args.instances) < 1:
        ap.error("counts must be >= 1")
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    failed: BaseException | None = None
    try:
        print(f"1. {args.jobs} jobs of {args.job_ms} ms, instances {args.instances}", flush=True)
        jobs, over = asyncio.run(both(args))
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    body = report(jobs, over, args, argv, time.monotonic() - started)
    print()
    print(body)
    print(f"no process left behind ({len(TRACKER.seen)} tracked)")
    if not args.no_write:
        write_section(body, HEADING)
        print(f"wrote the {HEADING!r} section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
