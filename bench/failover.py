"""Failover benchmark: idempotent calls while instances are SIGKILLed.

Run with ``python bench/failover.py`` (hsu and hsu-echo installed). A kernel
runs in this process with the echo unit at 4 instances; for each caller in
turn, a load process makes ``--calls`` idempotent ``Echo`` calls
(``--inflight`` at a time, each held ``--hold-ms`` by the instance, 10 s
deadline) while this process SIGKILLs one ready instance (a real pid from
``kernel.instances``) every ``--kill-every`` seconds. The kernel restarts
each one at once (``restart.backoff.reset_after: 0.5``, and a crash-loop
breaker that 1,000 failures a second would not trip: the bench is about
routing, not restart policy). The callers:

- ``connect``: ``hsu.connect(kernel.control_address)``, grpc.aio stubs;
- ``connect_sync``: ``hsu.connect_sync(kernel.control_address)``, blocking stubs on threads;
- ``gateway``: a plain grpc.aio stub on the kernel's address (no client retry policy).

It reports, per caller, the calls, the failed ones (and why), p50/p99 latency
of the calls that succeeded, and the kills, and replaces the ``## Failover``
section of ``docs/benchmarks.md`` unless ``--no-write``. Everything listens on
127.0.0.1; every instance it starts is stopped by pid, and the run fails if any
is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import DOC, RUN_MARK, TRACKER, interrupted, reap_leftovers, versions, write_section

HEADING = "## Failover"
INTERFACE = "hsu.echo.v1.Echo"
CALLERS = ("connect", "connect_sync", "gateway")
CALL_TIMEOUT = 10.0


# -- the load (a process of its own) ------------------------------------------------


def quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0 for no values)."""
    if not xs:
        return 0.0
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Tally:
    """Calls handed out to workers, and their outcomes."""

    def __init__(self, calls: int):
        self.left = calls
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            self.left -= 1
            return self.left >= 0

    def failed(self, exc: BaseException) -> None:
        code = getattr(exc, "code", None)
        what = f"{code().name}: {exc.details()}" if callable(code) else repr(exc)  # type: ignore[attr-defined]
        with self.lock:
            self.errors[what[:160]] += 1


def run_load(caller: str, address: str, control: str, calls: int, inflight: int, hold: int) -> None:
    """Make the calls through ``caller``; print the tally as one JSON line."""
    import grpc

    import hsu
    from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

    request = echo_pb2.EchoRequest(message="failover", delay_ms=hold)
    tally = Tally(calls)
    clock = time.perf_counter
    started = clock()

    async def run_async() -> None:
        if caller == "connect":
            channel: Any = hsu.connect(control)
        else:
            channel = grpc.aio.insecure_channel(address, options=(("grpc.enable_http_proxy", 0),))
        echo = echo_pb2_grpc.EchoStub(channel)

        async def worker() -> None:
            while tally.take():
                t = clock()
                try:
                    await echo.Echo(request, timeout=CALL_TIMEOUT)
                except (grpc.RpcError, grpc.aio.UsageError) as exc:
                    tally.failed(exc)
                else:
                    tally.latencies.append(clock() - t)

        try:
            await asyncio.gather(*(worker() for _ in range(inflight)))
        finally:
            await channel.close()

    def run_threads() -> None:
        with hsu.connect_sync(control) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)

            def worker() -> None:
                while tally.take():
                    t = clock()
                    try:
                        echo.Echo(request, timeout=CALL_TIMEOUT)
                    except (grpc.RpcError, ValueError) as exc:
                        tally.failed(exc)
                    else:
                        with tally.lock:
                            tally.latencies.append(clock() - t)

            threads = [threading.Thread(target=worker) for _ in range(inflight)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    if caller == "connect_sync":
        run_threads()
    else:
        asyncio.run(run_async())
    seconds = clock() - started
    print(
        json.dumps(
            {
                "calls": calls,
                "failed": sum(tally.errors.values()),
                "errors": dict(tally.errors.most_common(5)),
                "p50": quantile(tally.latencies, 0.5),
                "p99": quantile(tally.latencies, 0.99),
                "seconds": seconds,
            }
        ),
        flush=True,
    )


# -- the kernel and the kills (this process) ----------------------------------------


def deployment() -> dict[str, Any]:
    return {
        "name": "bench-failover",
        "kernel": {"drain_grace": 1},
        "units": {
            "echo": {
                "command": [sys.executable, "-m", "hsu_echo"],
                "interfaces": [INTERFACE],
                "env": {"HSU_BENCH_RUN": RUN_MARK},
                "start": "at-start",
                "min_instances": 1,
                "max_instances": 4,
                "startup_timeout": 30,
                "stop_grace": 2,
                "routing": {"idempotent": ["Echo"]},
                "restart": {
                    "backoff": {"initial": 0.05, "max": 0.2, "reset_after": 0.5},
                    "crash_loop": {"max_failures": 1000, "window": 1},
                },
            }
        },
    }


def ready(kernel: Any) -> list[Any]:
    import hsu

    return [
        i
        for i in kernel.instances.values()
        if i.unit == "echo" and i.state is hsu.InstanceState.READY and i.pid
    ]


async def until(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def killer(kernel: Any, every: float, stop: asyncio.Event, kills: list[int]) -> None:
    """SIGKILL a random ready instance every ``every`` seconds until ``stop``."""
    rng = random.Random(1)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        victims = ready(kernel)
        TRACKER.add(i.pid for i in kernel.instances.values() if i.pid)
        if victims:
            victim = rng.choice(victims)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGKILL)
                kills.append(victim.pid)


async def phase(kernel: Any, caller: str, args: argparse.Namespace) -> dict[str, Any]:
    await until("4 ready instances", lambda: len(ready(kernel)) == args.instances)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env["HSU_BENCH_RUN"] = RUN_MARK
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--load",
        caller,
        "--address",
        kernel.address,
        "--control",
        kernel.control_address,
        "--calls",
        str(args.calls),
        "--inflight",
        str(args.inflight),
        "--hold-ms",
        str(args.hold_ms),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    TRACKER.add([load.pid])
    stop = asyncio.Event()
    kills: list[int] = []
    task = asyncio.ensure_future(killer(kernel, args.kill_every, stop, kills))
    try:
        out, _ = await asyncio.wait_for(load.communicate(), 600)
    finally:
        stop.set()
        await task
        if load.returncode is None:
            load.kill()
            await load.wait()
    if load.returncode != 0:
        raise RuntimeError(f"the {caller} load exited with {load.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["kills"] = len(kills)
    return result


async def bench(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from loguru import logger

    from hsu._kernel.config.model import deployment_from_dict
    from hsu._kernel.kernel import Kernel
    from hsu._kernel.plugins import PluginManager

    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hb-failover-") as base:
        plan = deployment_from_dict(deployment(), source="bench/failover.py", base_dir=base)
        plugins = PluginManager.load([], env={}, autoload=False)
        kernel = Kernel(plan, plugins, address="127.0.0.1:0")
        await kernel.start()
        try:
            await kernel.scale("echo", args.instances)
            for caller in args.callers:
                print(f"  {caller}: {args.calls} calls ...", flush=True)
                r = results[caller] = await phase(kernel, caller, args)
                print(
                    f"  {caller}: {r['failed']} failed of {r['calls']} in {r['seconds']:.1f} s,"
                    f" {r['kills']} kills, p50 {r['p50'] * 1e3:.1f} ms,"
                    f" p99 {r['p99'] * 1e3:.1f} ms",
                    flush=True,
                )
                for what, n in r["errors"].items():
                    print(f"      {n} x {what}", flush=True)
        finally:
            TRACKER.add(i.pid for i in kernel.instances.values() if i.pid)
            await kernel.stop("bench finished")
    return results


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, took: float) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = versions("hsu", "grpcio")
    lines = [
        HEADING,
        "",
        f"Measured {when} by `bench/failover.py` ({took:.0f} s). Machine: {os.cpu_count()} CPUs,"
        f" {platform.machine()}, Python {platform.python_version()}. Versions: hsu {v['hsu']},"
        f" grpcio {v['grpcio']}.",
        "",
        f"{args.calls:,} idempotent `Echo` calls per caller, {args.inflight} in flight, each held"
        f" {args.hold_ms} ms by the instance (10 s deadline), while one of {args.instances}"
        f" instances is SIGKILLed every {args.kill_every * 1e3:.0f} ms and restarted by the"
        " kernel. The kernel runs in the bench's process, the calls in a process of their own."
        " Latency is of the calls that succeeded.",
        "",
        "| caller | calls | failed | kills | p50 | p99 | took |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "connect": "`hsu.connect` (grpc.aio stubs)",
        "connect_sync": "`hsu.connect_sync` (blocking stubs, threads)",
        "gateway": "plain grpc.aio stub to the kernel's address (no retry policy)",
    }
    for caller, r in results.items():
        lines.append(
            f"| {names[caller]} | {r['calls']:,} | {r['failed']:,} | {r['kills']} |"
            f" {r['p50'] * 1e3:.1f} ms | {r['p99'] * 1e3:.1f} ms | {r['seconds']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10_000, help="calls per caller (default 10000)")
    ap.add_argument("--inflight", type=int, default=16, help="calls in flight (default 16)")
    ap.add_argument("--hold-ms", type=int, default=50, help="ms each call is held (default 50)")
    ap.add_argument("--kill-every", type=float, default=0.3, help="s between kills (default 0.3)")
    ap.add_argument("--instances", type=int, default=4, help="instances (default 4)")
    ap.add_argument("--callers", nargs="+", choices=CALLERS, default=list(CALLERS))
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    # the load process's own arguments
    ap.add_argument("--load", choices=CALLERS, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load:
        run_load(args.load, args.address, args.control, args.calls, args.inflight, args.hold_ms)
        return 0
    if min(args.calls, args.inflight, args.instances) < 1 or args.kill_every <= 0:
        ap.error("counts must be >= 1 and --kill-every > 0")
    signal.signal(signal.SIGTERM, interrupted)  # so the cleanup below still runs
    started = time.monotonic()
    failed: BaseException | None = None
    print(
        f"Failover: {args.calls} calls per caller, {args.inflight} in flight, a kill every"
        f" {args.kill_every:g} s",
        flush=True,
    )
    try:
        results = asyncio.run(bench(args))
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    text = report(results, args, time.monotonic() - started)
    print()
    print(text)
    if not args.no_write:
        write_section(text, HEADING)
        print(f"updated {DOC.relative_to(Path(DOC).parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
