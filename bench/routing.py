"""Routing benchmark: calls through hsu side by side with direct gRPC calls.

Run with ``python bench/routing.py`` (hsu and hsu-echo installed). One run
measures, against one ``python -m hsu_echo`` instance on loopback:

1. throughput, latency and CPU per call of ``Echo`` with 1 and 32 calls in
   flight, side by side in rotating order, round after round: a plain grpc.aio
   stub straight to the instance (raw), ``hsu.connect`` (routed) and a plain
   stub to the kernel's address (the gateway), and, when nginx is installed,
   a plain stub to the kernel's nginx data plane (``hsu_plugins.gateway.nginx``
   on an address of its own, so that both gateways run in the same kernel);
   then all of them call by call;
2. the first call to an interface with no instance (started on demand, by a
   fresh kernel and by a kernel that scaled the unit to zero), next to the
   floor: spawning the same server without a kernel and calling it until it
   answers;
3. in-process costs with 1,000 endpoints: one balancer pick per strategy and
   one ``MemoryRegistry`` lookup.

It prints the results and replaces the ``## Routing`` section of
``docs/benchmarks.md`` (other sections are left alone). Everything listens on
127.0.0.1; every process it starts is stopped by pid and the run fails if any
is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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
from hsu._kernel.plugins import PluginManager
from hsu.client.route import Policy, Route
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.ports import Endpoint
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

HEADING = "## Routing"
UNIT = "echo"
INTERFACE = "hsu.echo.v1.Echo"
REQUEST = echo_pb2.EchoRequest(message="hello")
#: per call: a reply slower than this fails the run
CALL_TIMEOUT = 10.0
#: the floor's channel tries to connect again 2-5 ms after a refused attempt
#: (grpc.min_reconnect_backoff_ms, the connect timeout, keeps its 20 s default)
FLOOR_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 2),
    ("grpc.max_reconnect_backoff_ms", 5),
)
PLAIN_OPTIONS = (("grpc.enable_http_proxy", 0),)
N_ENDPOINTS = 1000
NGINX_VERSION = ""
N_INTERFACES = 10


# -- processes ----------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any HSU_* setting (config overrides, a kernel
    address), marked with this run's id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env["HSU_BENCH_RUN"] = RUN_MARK
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    """SIGTERM, wait; SIGKILL if it does not go. Its children (if any) too."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
        TRACKER.add(k.pid for k in kids)
    except psutil.Error:
        kids = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {what}: no exit {timeout:g}s after SIGTERM; SIGKILL", file=sys.stderr)
            proc.kill()
            proc.wait(5)
    _, alive = psutil.wait_procs(kids, timeout=5)
    for p in alive:
        print(f"  {what}: child {p.pid} outlived it; SIGKILL", file=sys.stderr)
        with contextlib.suppress(psutil.Error):
            p.kill()


class KernelProc:
    """``python -m hsu run`` on a deployment of one echo unit, in a temp dir."""

    def __init__(self, tag: str, *, start: str, min_instances: int, nginx: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix=f"hb-route-{tag}-"))
        self.address = f"127.0.0.1:{free_port()}"
        #: the Kernel API's socket (the control plane)
        self.control = f"unix:{self.dir}/control.sock"
        #: the nginx data plane's address ("" without one)
        self.nginx = f"127.0.0.1:{free_port()}" if nginx else ""
        self.start_mode = start
        self.min_instances = min_instances
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def deployment(self) -> str:
        plane = (
            f"plugins: [hsu_plugins.gateway.nginx]\ngateway_nginx: {{address: {self.nginx}}}\n"
            if self.nginx
            else ""
        )
        return plane + textwrap.dedent(f"""\
            name: bench-routing
            kernel:
              address: {self.address}
              control: {self.control}
              drain_grace: 1
            units:
              {UNIT}:
                command: [python, -m, hsu_echo]
                interfaces: [{INTERFACE}]
                start: {self.start_mode}
                min_instances: {self.min_instances}
                max_instances: 1
                startup_timeout: 30
                stop_grace: 2
                routing:
                  balancer: round_robin
            """)

    def start(self) -> None:
        (self.dir / "deployment.yaml").write_text(self.deployment())
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
        self.channel = grpc.insecure_channel(self.control, options=PLAIN_OPTIONS)

    @property
    def stub(self) -> Any:
        assert self.channel is not None
        return kernel_pb2_grpc.KernelStub(self.channel)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "kernel.out").read_text(errors="replace")
        except OSError:
            return "(no kernel output)"
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the kernel exited with {self.proc.returncode}:\n{self.log_tail()}")

    def wait_running(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                status = self.stub.Status(kernel_pb2.StatusRequest(), timeout=1.0)
                if status.state == "running":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kernel not running after {timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def instances(self) -> list[Any]:
        reply = self.stub.ListInstances(kernel_pb2.ListInstancesRequest(unit=UNIT), timeout=5.0)
        return list(reply.instances)

    def wait_ready(self, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            ready = [i for i in self.instances() if i.state == "ready" and i.address]
            if ready:
                TRACKER.add(i.pid for i in ready)
                return ready[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ready instance after {timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def scale_to_zero(self) -> None:
        """Kernel.Scale(echo, 0): stop the instance and drop its slot; wait
        until its process is gone."""
        pids = [i.pid for i in self.instances() if i.pid]
        TRACKER.add(pids)
        self.stub.Scale(kernel_pb2.ScaleRequest(unit=UNIT, count=0), timeout=30.0)
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and not _zombie(p) for p in pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"instance pids {pids} still alive 10s after Scale(0)")
            time.sleep(0.01)
        if self.instances():
            raise RuntimeError("instances still listed after Scale(0)")

    def nginx_pids(self) -> list[int]:
        """nginx's master and workers (empty without the data plane)."""
        try:
            master = int((self.dir / ".hsu/bench-routing/nginx/nginx.pid").read_text())
            return [master, *(c.pid for c in psutil.Process(master).children())]
        except (OSError, ValueError, psutil.Error):
            return []

    def wait_nginx_routes(self, address: str, timeout: float = 10.0) -> None:
        """Wait until nginx's configuration sends calls straight to ``address``."""
        conf = self.dir / ".hsu/bench-routing/nginx/nginx.conf"
        deadline = time.monotonic() + timeout
        while f'server "{address}"' not in conf.read_text():  # the renderer quotes
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx never routed to {address}:\n{self.log_tail()}")
            time.sleep(0.01)
        time.sleep(0.3)  # the reload: new workers up, old ones gone

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None:
            stop_process(self.proc, "kernel")
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# -- statistics -----------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank quantile."""
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -- 1. throughput and latency --------------------------------------------------------

#: nginx is measured only where it is installed (``--no-nginx`` leaves it out)
VARIANTS: tuple[str, ...] = ("raw", "routed", "gateway", "nginx")
VARIANT_DESC = {
    "raw": "grpc.aio stub straight to the instance",
    "routed": "`hsu.connect(kernel)` + stub",
    "gateway": "grpc.aio stub to the kernel's address",
    "nginx": "grpc.aio stub to the kernel's nginx data plane",
}


def cpu_seconds(pid: int) -> float:
    """On-CPU time of every thread of ``pid``, from schedstat (ns resolution)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    return total / 1e9


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


#: whose CPU time each window records
ROLES: tuple[str, ...] = ("caller", "kernel", "hsu", "nginx")


@dataclass
class Window:
    calls: int
    seconds: float
    latencies: list[float]
    #: role -> CPU seconds it used during the window
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def p50(self) -> float:
        return quantile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return quantile(self.latencies, 0.99)


async def drive(call: Callable[..., Awaitable[Any]], n: int, seconds: float, cap: int) -> Window:
    """``n`` tasks, each calling in a loop until ``seconds`` pass (or ``cap``
    calls in all)."""
    latencies: list[float] = []
    clock = time.perf_counter
    t0 = clock()
    stop_at = t0 + seconds

    async def worker() -> None:
        while clock() < stop_at and len(latencies) < cap:
            t = clock()
            await call(REQUEST, timeout=CALL_TIMEOUT)
            latencies.append(clock() - t)

    await asyncio.gather(*(worker() for _ in range(n)))
    return Window(len(latencies), clock() - t0, latencies)


@dataclass
class Throughput:
    #: (variant, n) -> one Window per round
    windows: dict[tuple[str, int], list[Window]] = field(default_factory=dict)
    instance_pid: int = 0
    #: seconds of the measured part, and CPU seconds the machine was busy in it,
    #: in all and for the three processes measured
    wall: float = 0.0
    busy: float = 0.0
    ours: float = 0.0
    #: variant -> latencies of the calls made in turn with the other variants
    alternating: dict[str, list[float]] = field(default_factory=dict)
    alternate_seconds: float = 0.0


async def alternate(
    calls: dict[str, Callable[..., Awaitable[Any]]], seconds: float, cap: int
) -> dict[str, list[float]]:
    """One task calling each variant in turn (rotating which goes first), so
    that every variant sees the same moments of a noisy machine."""
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    clock = time.perf_counter
    stop_at = clock() + seconds
    i = 0
    while clock() < stop_at and i < cap:
        for j in range(len(VARIANTS)):
            v = VARIANTS[(i + j) % len(VARIANTS)]
            t = clock()
            await calls[v](REQUEST, timeout=CALL_TIMEOUT)
            out[v].append(clock() - t)
        i += 1
    return out


async def _throughput(
    kernel: KernelProc,
    hsu_address: str,
    ns: Sequence[int],
    rounds: int,
    seconds: float,
    warmup: float,
    cap: int,
    alternating: float,
) -> Throughput:
    raw_ch = grpc.aio.insecure_channel(hsu_address, options=PLAIN_OPTIONS)
    gw_ch = grpc.aio.insecure_channel(kernel.address, options=PLAIN_OPTIONS)
    nginx_ch = grpc.aio.insecure_channel(kernel.nginx or kernel.address, options=PLAIN_OPTIONS)
    routed_ch = hsu.connect(kernel.control)
    calls = {
        "raw": echo_pb2_grpc.EchoStub(raw_ch).Echo,
        "routed": echo_pb2_grpc.EchoStub(routed_ch).Echo,
        "gateway": echo_pb2_grpc.EchoStub(gw_ch).Echo,
        "nginx": echo_pb2_grpc.EchoStub(nginx_ch).Echo,
    }
    out = Throughput()
    try:
        pids = set()
        for v in VARIANTS:  # connect, resolve, warm every path once
            await drive(calls[v], 4, max(warmup, 0.5), cap)
            pids.add((await calls[v](REQUEST, timeout=CALL_TIMEOUT)).pid)
        if len(pids) != 1:
            raise RuntimeError(f"the variants reached different instances: {pids}")
        out.instance_pid = pids.pop()
        assert kernel.proc is not None
        roles = {"caller": [os.getpid()], "kernel": [kernel.proc.pid], "hsu": [out.instance_pid]}
        roles["nginx"] = kernel.nginx_pids()
        TRACKER.add(roles["nginx"])

        def cpu_now() -> dict[str, float]:
            return {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}

        wall0, busy0, ours0 = time.monotonic(), machine_busy(), sum(cpu_now().values())
        for r in range(rounds):
            for j, n in enumerate(ns):
                k = (r + j) % len(VARIANTS)
                order = VARIANTS[k:] + VARIANTS[:k]
                for v in order:
                    await drive(calls[v], n, warmup, cap)
                    before = cpu_now()
                    w = await drive(calls[v], n, seconds, cap)
                    after = cpu_now()
                    w.cpu = {role: after[role] - before[role] for role in ROLES}
                    out.windows.setdefault((v, n), []).append(w)
                    print(
                        f"  round {r + 1}/{rounds} N={n:<2} {v:<7} {w.rate:7.0f} calls/s"
                        f"  p50 {w.p50 * 1e3:6.2f} ms  p99 {w.p99 * 1e3:6.2f} ms  CPU us/call "
                        + " / ".join(f"{w.cpu[x] / w.calls * 1e6:.0f}" for x in ROLES),
                        flush=True,
                    )
        out.wall = time.monotonic() - wall0
        out.busy = machine_busy() - busy0
        out.ours = sum(cpu_now().values()) - ours0
        if alternating > 0:
            out.alternating = await alternate(calls, alternating, cap)
            out.alternate_seconds = alternating
            print(
                "  call by call: "
                + "  ".join(
                    f"{v} p50 {quantile(out.alternating[v], 0.5) * 1e3:.3f} ms" for v in VARIANTS
                ),
                flush=True,
            )
    finally:
        await routed_ch.close()
        await raw_ch.close()
        await gw_ch.close()
        await nginx_ch.close()
    return out


def bench_throughput(
    ns: Sequence[int], rounds: int, seconds: float, warmup: float, cap: int, alternating: float
) -> Throughput:
    k = KernelProc("tput", start="at-start", min_instances=1, nginx="nginx" in VARIANTS)
    try:
        k.start()
        k.wait_running()
        inst = k.wait_ready()
        if k.nginx:
            k.wait_nginx_routes(inst.address)
        return asyncio.run(
            _throughput(k, inst.address, ns, rounds, seconds, warmup, cap, alternating)
        )
    finally:
        k.stop()


# -- 2. first call -------------------------------------------------------------------


@dataclass
class First:
    #: seconds from issuing the call to its reply
    total: float
    #: seconds from issuing the call to the process spawned (hsu: the kernel's
    #: started_at; floor: Popen returned)
    spawned: float
    #: seconds from issuing the call to the HSU registered (hsu only)
    registered: float | None = None


def _since(ts: Any, wall0: float) -> float:
    return ts.seconds + ts.nanos / 1e9 - wall0


async def first_routed(kernel: KernelProc) -> First:
    """``hsu.connect`` + the first Echo, on a kernel with no instance."""
    if kernel.instances():
        raise RuntimeError("the kernel already has an instance before the first call")
    wall0 = time.time()
    t0 = time.perf_counter()
    channel = hsu.connect(kernel.control)
    try:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(REQUEST, timeout=60)
        t1 = time.perf_counter()
    finally:
        await channel.close()
    insts = kernel.instances()
    TRACKER.add(i.pid for i in insts)
    inst = next((i for i in insts if i.pid == reply.pid), None)
    if inst is None:
        raise RuntimeError(f"pid {reply.pid} answered but the kernel does not list it")
    return First(t1 - t0, _since(inst.started_at, wall0), _since(inst.registered_at, wall0))


async def first_bare(workdir: Path) -> First:
    """Spawn ``python -m hsu_echo`` standalone and call Echo until it answers."""
    address = f"127.0.0.1:{free_port()}"
    out = open(workdir / "bare.out", "ab")  # noqa: SIM115, ASYNC230 - the child keeps it
    channel = grpc.aio.insecure_channel(address, options=FLOOR_OPTIONS)
    proc: subprocess.Popen[bytes] | None = None
    try:
        stub = echo_pb2_grpc.EchoStub(channel)
        t0 = time.perf_counter()
        proc = subprocess.Popen(  # noqa: ASYNC220 - part of what is timed
            [sys.executable, "-m", "hsu_echo"],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(HSU_LISTEN=address),
        )
        t_spawned = time.perf_counter()
        TRACKER.add([proc.pid])
        reply = await stub.Echo(REQUEST, timeout=60, wait_for_ready=True)
        t1 = time.perf_counter()
        if reply.pid != proc.pid:
            raise RuntimeError(f"{address}: answered by pid {reply.pid}, not {proc.pid}")
        return First(t1 - t0, t_spawned - t0)
    finally:
        out.close()
        await channel.close()
        if proc is not None:
            stop_process(proc, "bare hsu_echo")


async def _first_calls(reps: int, settle: float) -> dict[str, list[First]]:
    out: dict[str, list[First]] = {"floor": [], "fresh": [], "warm": []}
    workdir = Path(tempfile.mkdtemp(prefix="hb-route-bare-"))
    warm = KernelProc("warm", start="on-demand", min_instances=0)
    try:
        warm.start()
        warm.wait_running()
        # one on-demand start and stop first, so the long-lived kernel has
        # been through it (what "warm" means below)
        await first_routed(warm)
        warm.scale_to_zero()
        for rep in range(reps):
            kinds = ["floor", "fresh", "warm"]
            kinds = kinds[rep % 3 :] + kinds[: rep % 3]
            for kind in kinds:
                if kind == "floor":
                    await asyncio.sleep(settle)
                    out[kind].append(await first_bare(workdir))
                elif kind == "warm":
                    await asyncio.sleep(settle)
                    out[kind].append(await first_routed(warm))
                    warm.scale_to_zero()
                else:
                    fresh = KernelProc("fresh", start="on-demand", min_instances=0)
                    try:
                        fresh.start()
                        fresh.wait_running()
                        await asyncio.sleep(settle)
                        out[kind].append(await first_routed(fresh))
                    finally:
                        fresh.stop()
            line = "  ".join(
                f"{k} {out[k][-1].total * 1e3:.0f} ms" for k in ("floor", "fresh", "warm")
            )
            print(f"  rep {rep + 1}/{reps}: {line}", flush=True)
    finally:
        warm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def bench_first_calls(reps: int, settle: float) -> dict[str, list[First]]:
    return asyncio.run(_first_calls(reps, settle))


# -- 3. balancers and registry ----------------------------------------------------------

#: (label, strategy, options, key, weights 1..4)
STRATEGIES: tuple[tuple[str, str, dict[str, Any], str | None, bool], ...] = (
    ("round_robin", "round_robin", {}, None, False),
    ("weighted_round_robin, weights 1", "weighted_round_robin", {}, None, False),
    ("weighted_round_robin, weights 1-4", "weighted_round_robin", {}, None, True),
    ("least_inflight", "least_inflight", {}, None, False),
    ("random", "random", {}, None, False),
    ("p2c", "p2c", {}, None, False),
    ("ring_hash, keyed", "ring_hash", {}, "user-42", False),
    ("ring_hash, keyless", "ring_hash", {}, None, False),
    ("ring_hash, keyed, bounded_load 1.25", "ring_hash", {"bounded_load": 1.25}, "user-42", False),
    ("maglev, keyed", "maglev", {}, "user-42", False),
    ("maglev, keyless", "maglev", {}, None, False),
    ("maglev, keyed, bounded_load 1.25", "maglev", {"bounded_load": 1.25}, "user-42", False),
)


def endpoints(n: int, interfaces: int = 1, weighted: bool = False) -> list[Endpoint]:
    rng = random.Random(7)
    return [
        Endpoint(
            instance_id=f"echo-{i:08x}",
            unit="echo",
            address=f"127.0.0.1:{20000 + i}",
            interfaces=(f"bench.v1.Service{i % interfaces}",),
            weight=rng.randint(1, 4) if weighted else 1,
        )
        for i in range(n)
    ]


def per_call(stmt: Callable[[], Any], repeat: int) -> float:
    """Seconds per call: the minimum over ``repeat`` timings of a batch sized
    to take about 0.05 s."""
    timer = timeit.Timer(stmt)
    number, took = timer.autorange()
    number = max(1, int(number * 0.05 / max(took, 1e-9)))
    return min(timer.repeat(repeat, number)) / number


@dataclass
class Micro:
    #: label -> (update seconds, pick seconds idle, pick seconds busy)
    balancers: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    #: label -> seconds per operation
    other: dict[str, float] = field(default_factory=dict)


class _OneRoute:
    """A resolver for a RoutedChannel: one route, one endpoint, no kernel."""

    def __init__(self, plugins: PluginManager):
        self.plugins = plugins

    async def route(self, interface: str, timeout: float | None) -> Route:
        route = Route(interface, Policy(unit="echo"), self.plugins)
        route.replace(endpoints(1, 1))
        return route

    async def ensure(self, route: Route, timeout: float | None) -> None:
        pass

    def began(self, ep: Endpoint) -> None:
        pass

    def ended(self, ep: Endpoint) -> None:
        pass

    async def acquire(self, *args: Any) -> Any:
        raise AssertionError("the bench's unit has no max_inflight: no slot is taken")

    def release(self, grant: Any) -> None:
        raise AssertionError("the bench's unit has no max_inflight: no slot is given back")

    async def close(self) -> None:
        pass


class _NoopChannel:
    """A channel whose unary calls return at once (their request)."""

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async def call(request: Any, **kwargs: Any) -> Any:
            return request

        return call

    async def close(self) -> None:
        pass


CLIENT_OWN = (
    "`hsu.connect`'s own work per unary call: a RoutedChannel stub over a no-op"
    " channel, minus the no-op call"
)


async def client_overhead(plugins: PluginManager, repeat: int, number: int = 20_000) -> float:
    """Seconds a RoutedChannel adds to each unary call, with no network."""
    noop = _NoopChannel()
    channel = hsu.RoutedChannel(_OneRoute(plugins), plugins)  # type: ignore[arg-type]
    channel.channel = lambda address: noop  # type: ignore[assignment, method-assign]
    routed = echo_pb2_grpc.EchoStub(channel).Echo
    direct = noop.unary_unary(f"/{INTERFACE}/Echo")
    best = {"routed": math.inf, "direct": math.inf}
    await routed(REQUEST, timeout=CALL_TIMEOUT)
    for _ in range(repeat):
        for name, call in (("direct", direct), ("routed", routed)):
            t = time.perf_counter()
            for _ in range(number):
                await call(REQUEST, timeout=CALL_TIMEOUT)
            best[name] = min(best[name], (time.perf_counter() - t) / number)
    await channel.close()
    return best["routed"] - best["direct"]


def bench_micro(repeat: int) -> Micro:
    out = Micro()
    plugins = PluginManager.load([])
    plain = endpoints(N_ENDPOINTS)
    weighted = endpoints(N_ENDPOINTS, weighted=True)
    idle: dict[str, int] = {}
    busy = {e.instance_id: 1 + i % 4 for i, e in enumerate(plain)}
    for label, name, options, key, is_weighted in STRATEGIES:
        factory = plugins.balancer(name)
        eps = weighted if is_weighted else plain
        updates = []
        changes = []
        for _ in range(3):
            b = factory.create(factory.options(**options))
            t = time.perf_counter()
            b.update(eps)
            b.pick(idle, key)  # a lazy build (maglev's table) is paid by the first pick
            updates.append(time.perf_counter() - t)
            t = time.perf_counter()
            b.update(eps[1:])  # one instance leaves...
            b.pick(idle, key)
            b.update(eps)  # ...and comes back, as in a rolling restart
            b.pick(idle, key)
            changes.append(time.perf_counter() - t)
        pick = b.pick
        if pick(idle, key) is None:
            raise RuntimeError(f"{label}: picked nothing")
        t_idle = per_call(lambda pick=pick, key=key: pick(idle, key), repeat)
        t_busy = per_call(lambda pick=pick, key=key: pick(busy, key), repeat)
        out.balancers[label] = (min(updates), min(changes), t_idle, t_busy)
        print(f"  {label:<38} pick {t_idle * 1e6:6.2f} / {t_busy * 1e6:6.2f} us", flush=True)

    # what hsu.connect does per call around the pick: the breaker and the counts
    route = Route(INTERFACE, Policy(unit="echo"), plugins)
    route.replace(plain)

    def one_call() -> None:
        ep = route.pick(None)
        assert ep is not None
        route.begin(ep)
        route.end(ep, True)

    for _ in range(2 * N_ENDPOINTS):  # every breaker made
        one_call()
    out.other["Route.pick + begin + end (round_robin, consecutive breaker)"] = per_call(
        one_call, repeat
    )
    out.other[CLIENT_OWN] = asyncio.run(client_overhead(plugins, repeat))

    from hsu_plugins.routing.registry_memory import MemoryRegistry

    async def registry_costs() -> None:
        for interfaces in (N_INTERFACES, 1):
            reg = MemoryRegistry()
            for ep in endpoints(N_ENDPOINTS, interfaces):
                await reg.put(ep)
            iface = "bench.v1.Service3" if interfaces > 1 else "bench.v1.Service0"
            per = N_ENDPOINTS // interfaces
            if len(reg.lookup_now(iface)) != per or len(await reg.lookup(iface)) != per:
                raise RuntimeError("the registry lost endpoints")
            what = f"{N_ENDPOINTS} endpoints, {interfaces} interface(s): {per} returned"
            out.other[f"`MemoryRegistry.lookup_now` (sync), {what}"] = per_call(
                lambda reg=reg, iface=iface: reg.lookup_now(iface), repeat
            )
            number = 20_000 if interfaces > 1 else 2_000
            best = math.inf
            for _ in range(repeat):
                t = time.perf_counter()
                for _ in range(number):
                    await reg.lookup(iface)
                best = min(best, (time.perf_counter() - t) / number)
            out.other[f"`await MemoryRegistry.lookup`, {what}"] = best
            await reg.close()

    asyncio.run(registry_costs())
    return out


# -- report ------------------------------------------------------------------------------


MET = {True: "**met**", False: "**not met**"}


def report(
    tp: Throughput,
    ns: Sequence[int],
    first: dict[str, list[First]],
    micro: Micro,
    args: argparse.Namespace,
    argv: Sequence[str],
    runtime: float,
) -> str:
    v = versions("hsu", "hsu-echo", "grpcio", "protobuf", "psutil")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/routing.py", *(shlex.quote(a) for a in argv)])
    lines = [
        HEADING,
        "",
        f"Measured {now} by `{command}` ({runtime:.0f} s). Machine: {os.cpu_count()} CPUs,"
        f" {platform.machine()}, Linux {platform.release()}, Python"
        f" {platform.python_version()}. Versions: hsu {v['hsu']}, hsu-echo {v['hsu-echo']},"
        f" grpcio {v['grpcio']}, protobuf {v['protobuf']}.",
        "",
        "The machine is small and shared, so timings are noisy: the variants run side by",
        "side in one run, in rotating order, and only numbers from the same run should be",
        "compared. The bench process, the kernel and the HSU share the CPUs.",
        "",
    ]
    # 1.
    rounds = len(next(iter(tp.windows.values())))
    lines += [
        f"### 1. `Echo` through hsu vs direct ({rounds} rounds, {args.duration:g} s each)",
        "",
        "One `python -m hsu_echo` instance under a kernel (`start: at-start`,",
        "`balancer: round_robin`), called from the bench process by N asyncio tasks, each",
        "calling `Echo` in a loop (one channel per variant; 'hello', no deadline pressure:",
        f"{CALL_TIMEOUT:g} s). For each N, the {len(VARIANTS)} variants run in rotating order,",
        f"each after a {args.warmup:g} s warm-up, for {rounds} rounds; a cell is the median over",
        "the rounds (latencies are per call, measured in the caller). Ratios are the median of the",
        "per-round ratios of calls/s to raw in the same round, with their range. CPU per",
        "call: on-CPU time of each process during the window (all its threads, from",
        "`/proc/PID/task/*/schedstat`) / calls, for the bench process (the caller), the",
        "kernel, the HSU"
        + (" and nginx (its master and workers)." if "nginx" in VARIANTS else "."),
        *(
            [
                "",
                "nginx: the kernel runs with `plugins: [hsu_plugins.gateway.nginx]` and",
                "`gateway_nginx.address` set to a port of its own, so that the Python gateway",
                "keeps the kernel's port and both gateways forward to the same instance in one",
                "run (without `address`, nginx takes the kernel's port: the same data path).",
                f"{NGINX_VERSION}, `worker_processes 1`.",
            ]
            if "nginx" in VARIANTS
            else [
                "",
                "nginx (`hsu_plugins.gateway.nginx`) was not measured in this run: nginx is not",
                "installed here (or `--no-nginx` was given).",
            ]
        ),
        "",
        f"While this part ran ({tp.wall:.0f} s) the machine's {os.cpu_count()} CPUs were busy"
        f" {tp.busy / tp.wall / (os.cpu_count() or 1):.0%} of the time;"
        f" processes other than these used {max(0.0, tp.busy - tp.ours) / tp.wall:.2f}"
        " CPUs on average.",
        "",
        "| N | variant | calls/s | p50 ms | p99 ms | vs raw (range) |"
        f" CPU us/call: {' / '.join(r if r != 'hsu' else 'HSU' for r in ROLES)} |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratio_med: dict[tuple[str, int], float] = {}
    ratio_range: dict[tuple[str, int], tuple[float, float]] = {}
    for n in ns:
        raw = tp.windows["raw", n]
        for var in VARIANTS:
            ws = tp.windows[var, n]
            rate = median([w.rate for w in ws])
            p50 = median([w.p50 for w in ws])
            p99 = median([w.p99 for w in ws])
            if var == "raw":
                rel = "1"
            else:
                rs = [w.rate / r.rate for w, r in zip(ws, raw, strict=True)]
                ratio_med[var, n] = median(rs)
                ratio_range[var, n] = (min(rs), max(rs))
                rel = f"{median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"
            cpu = " / ".join(f"{median([w.cpu[x] / w.calls for w in ws]) * 1e6:.0f}" for x in ROLES)
            lines.append(
                f"| {n} | {var}: {VARIANT_DESC[var]} | {rate:,.0f} | {p50 * 1e3:.2f} |"
                f" {p99 * 1e3:.2f} | {rel} | {cpu} |"
            )
    lines.append("")
    if tp.alternating:
        alt = tp.alternating
        raw50 = quantile(alt["raw"], 0.5)
        lines += [
            f"Call by call: one task calling {', '.join(VARIANTS)} in turn (the first",
            f"rotating) for {tp.alternate_seconds:g} s, so that all see the same",
            "moments of the machine; N=1. The last column is the variant's added latency.",
            "",
            "| variant | calls | p50 ms | mean ms | p99 ms | p50 - raw's p50, us |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for var in VARIANTS:
            xs = alt[var]
            lines.append(
                f"| {var} | {len(xs):,} | {quantile(xs, 0.5) * 1e3:.3f} |"
                f" {statistics.fmean(xs) * 1e3:.3f} | {quantile(xs, 0.99) * 1e3:.3f} |"
                f" {(quantile(xs, 0.5) - raw50) * 1e6:+.0f} |"
            )
        lines.append("")
    # 2.
    reps = len(first["floor"])
    fl, fr, wm = (median([f.total for f in first[k]]) for k in ("floor", "fresh", "warm"))
    lines += [
        f"### 2. First call to an interface with no instance ({reps} reps each)",
        "",
        "From issuing the call to its reply, timed in the bench process (grpc already",
        "imported). hsu: `hsu.connect(kernel)` + `Echo`; the timer includes `connect`, its",
        "plugin loading and `Kernel.Resolve`, which starts the instance on demand and",
        "answers once it has registered and is listed. Unit `start: on-demand`,",
        '`min_instances: 0`, two kinds of "no instance": a fresh kernel started for that',
        "one call (nothing ever ran in it), and one long-lived kernel whose instance is",
        "stopped and dropped with `Kernel.Scale(echo, 0)` after each call, i.e. scale to",
        "zero, then a call (that kernel did one such start before the first rep). The floor:",
        "spawn `python -m hsu_echo` with no kernel (`HSU_LISTEN` set) and call `Echo` with",
        "`wait_for_ready` on a channel that tries to connect again 2-5 ms after each refused",
        f"attempt. The three run in rotating order, each after {args.settle:g} s of quiet.",
        "Spawned / registered: the kernel's `started_at` and `registered_at` of the instance",
        "(floor: `Popen` returned), counted from the call; registered -> reply: per call,",
        "from `registered_at` to the reply (the HSU is up: what is left is hsu's).",
        "",
        "| path | median ms | min ms | max ms | spawned, median ms | registered, median ms |"
        " registered -> reply, median ms | vs floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "floor": "floor: bare `python -m hsu_echo` + `Echo`",
        "fresh": "hsu, fresh kernel",
        "warm": "hsu, same kernel after `Scale(0)`",
    }
    for kind in ("floor", "fresh", "warm"):
        fs = first[kind]
        tot = [f.total for f in fs]
        reg = [f.registered for f in fs if f.registered is not None]
        after = [f.total - f.registered for f in fs if f.registered is not None]
        spawned = median([f.spawned for f in fs])
        lines.append(
            f"| {names[kind]} | {median(tot) * 1e3:.0f} | {min(tot) * 1e3:.0f} |"
            f" {max(tot) * 1e3:.0f} | {spawned * 1e3:.1f} |"
            f" {f'{median(reg) * 1e3:.0f}' if reg else '-'} |"
            f" {f'{median(after) * 1e3:.1f}' if after else '-'} |"
            f" {'1' if kind == 'floor' else f'{median(tot) / fl:.2f}x'} |"
        )
    lines.append("")
    # 3.
    lines += [
        f"### 3. In-process costs with {N_ENDPOINTS:,} endpoints",
        "",
        "Balancers from the installed plugins (`PluginManager.load([]).balancer(name)`),",
        f"updated with {N_ENDPOINTS:,} endpoints (weight 1 unless said). A pick is timed with",
        f'`timeit`, the minimum of {args.repeat} batches of about 0.05 s; "idle": no call in',
        'flight; "busy": every endpoint has 1-4 calls in flight (the worst case for',
        "least_inflight and bounded loads). Build: `update()` of a new balancer plus its",
        "first pick (building its ring or table; Maglev fills lazily, in picks); one out",
        "and back: one endpoint removed and added again, each `update()` followed by a",
        "pick (a rolling restart's step). Both the minimum of 3; this time blocks the",
        "caller's event loop.",
        "",
        "| strategy | build ms | one out and back, ms | pick us, idle | pick us, busy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, (upd, chg, t_idle, t_busy) in micro.balancers.items():
        lines.append(
            f"| {label} | {upd * 1e3:.1f} | {chg * 1e3:.1f} | {t_idle * 1e6:.2f}"
            f" | {t_busy * 1e6:.2f} |"
        )
    lines += [
        "",
        "A bounded load sums the calls in flight of every endpoint when the key's owner is",
        "busy, and least_inflight compares every endpoint's load when none is idle: both",
        "grow with the number of endpoints, by design.",
    ]
    lines += [
        "",
        "Route bookkeeping, the routed channel's own work and registry lookups, the same",
        "way (async calls are awaited in a loop inside one event loop, the minimum of",
        f"{args.repeat} batches):",
        "",
        "| operation | us each |",
        "| --- | ---: |",
    ]
    for label, secs in micro.other.items():
        lines.append(f"| {label} | {secs * 1e6:.2f} |")
    lines.append("")
    # targets
    lines += ["### Targets (from the numbers above)", ""]

    def cpu_us(var: str, n: int, role: str) -> float:
        return median([w.cpu[role] / w.calls for w in tp.windows[var, n]]) * 1e6

    for n in ns:
        r, g = ratio_med["routed", n], ratio_med["gateway", n]
        lines.append(
            f"- N={n}: routed >= 0.95x raw: {MET[r >= 0.95]} ({r:.2f}x, rounds"
            f" {ratio_range['routed', n][0]:.2f}-{ratio_range['routed', n][1]:.2f}; caller CPU"
            " per call"
            f" {cpu_us('routed', n, 'caller'):.0f} us vs raw's {cpu_us('raw', n, 'caller'):.0f}"
            f" us); gateway >= 0.6x raw: {MET[g >= 0.6]} ({g:.2f}x; the kernel spends"
            f" {cpu_us('gateway', n, 'kernel'):.0f} us of CPU per forwarded call, the HSU"
            f" {cpu_us('gateway', n, 'hsu'):.0f} us to answer it)."
            + (
                f" Through nginx: {MET[ratio_med['nginx', n] >= 0.6]}"
                f" ({ratio_med['nginx', n]:.2f}x, rounds {ratio_range['nginx', n][0]:.2f}-"
                f"{ratio_range['nginx', n][1]:.2f}; nginx spends"
                f" {cpu_us('nginx', n, 'nginx'):.0f} us of CPU per call)."
                if "nginx" in VARIANTS
                else ""
            )
        )
    cpus = os.cpu_count() or 1
    for n in ns:
        bound = {v: cpus / sum(cpu_us(v, n, x) for x in ROLES) * 1e6 for v in VARIANTS}
        lines.append(
            f"- N={n}, CPU alone caps calls/s at {cpus} CPUs / (all CPU per call): "
            + ", ".join(
                f"{v} {bound[v]:,.0f}"
                + ("" if v == "raw" else f" ({bound[v] / bound['raw']:.2f}x)")
                for v in VARIANTS
            )
            + "."
        )
    if tp.alternating:
        alt = tp.alternating
        raw50 = quantile(alt["raw"], 0.5)
        lines.append(
            "- call by call, routed adds"
            f" {(quantile(alt['routed'], 0.5) - raw50) * 1e6:+.0f} us at p50 and the gateway"
            f" {(quantile(alt['gateway'], 0.5) - raw50) * 1e6:+.0f} us"
            + (
                f", nginx {(quantile(alt['nginx'], 0.5) - raw50) * 1e6:+.0f} us"
                if "nginx" in VARIANTS
                else ""
            )
            + " (raw:"
            f" {raw50 * 1e6:.0f} us)."
        )
    spread = max(hi - lo for (v, _), (lo, hi) in ratio_range.items() if v == "routed")
    own = micro.other[CLIENT_OWN]
    lines.append(
        f"- the routed/raw ratio of single rounds spreads over up to {spread:.2f} on this"
        " machine, more than the 5% the routed target allows. Steadier measures of what"
        f" `hsu.connect` adds: its own work, {own * 1e6:.1f} us per call (section 3), is"
        f" {own / (cpu_us('raw', max(ns), 'caller') * 1e-6):.1%} of the caller's CPU per raw"
        f" call at N={max(ns)}; and the call-by-call latency above."
    )
    lines.append(
        f"- first call <= 1.25x the floor: fresh kernel {MET[fr <= 1.25 * fl]} ({fr / fl:.2f}x:"
        f" {fr * 1e3:.0f} ms vs {fl * 1e3:.0f} ms); same kernel after `Scale(0)`"
        f" {MET[wm <= 1.25 * fl]} ({wm / fl:.2f}x: {wm * 1e3:.0f} ms)."
    )

    def own_ms(kind: str) -> float:
        """hsu's own share of a first call: to the spawn, and after registering."""
        fs = first[kind]
        spawn = median([f.spawned for f in fs])
        return (spawn + median([f.total - (f.registered or 0.0) for f in fs])) * 1e3

    lines.append(
        "- of a first call through hsu, hsu's own part (call to spawn, plus registered to"
        " reply: ready, Resolve's answer, connecting to the instance, the call) is"
        f" {own_ms('fresh'):.0f} ms (fresh kernel) and"
        f" {own_ms('warm'):.0f} ms (after `Scale(0)`); the rest is the HSU process starting"
        " (Python, imports, its server, registering), which the floor pays too."
    )
    lines.append("")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=1.0, help="s per window (default 1)")
    ap.add_argument("--warmup", type=float, default=0.2, help="s before each window (default 0.2)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of windows (default 10)")
    ap.add_argument(
        "--inflight", type=int, nargs="+", default=[1, 32], help="N values (default 1 32)"
    )
    ap.add_argument(
        "--alternate", type=float, default=3.0, help="s of call-by-call turns, 0: none (default 3)"
    )
    ap.add_argument("--max-calls", type=int, default=200_000, help="cap per window")
    ap.add_argument("--reps", type=int, default=8, help="first calls per path (default 8)")
    ap.add_argument("--settle", type=float, default=0.5, help="s idle before a first call")
    ap.add_argument("--repeat", type=int, default=5, help="timeit batches (default 5)")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    ap.add_argument("--no-nginx", action="store_true", help="leave out the nginx data plane")
    args = ap.parse_args(argv)
    global VARIANTS, ROLES, NGINX_VERSION
    nginx = shutil.which("nginx")
    if args.no_nginx or nginx is None:
        VARIANTS = tuple(v for v in VARIANTS if v != "nginx")
        ROLES = tuple(r for r in ROLES if r != "nginx")
        print("nginx: not measured (" + ("--no-nginx" if nginx else "not installed") + ")")
    else:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        NGINX_VERSION = (out.stderr or out.stdout).strip().replace("nginx version: ", "")
    if min(args.rounds, args.reps, args.repeat, *args.inflight) < 1 or args.duration <= 0:
        ap.error("counts must be >= 1 and the duration > 0")
    if not Path("/proc/self/task").exists():
        raise SystemExit("needs Linux /proc")
    started = time.monotonic()
    signal.signal(signal.SIGTERM, interrupted)  # so the cleanup below still runs
    failed: BaseException | None = None
    try:
        print(
            f"1. Echo throughput, N in {args.inflight}, {args.rounds} rounds of"
            f" {args.duration:g} s",
            flush=True,
        )
        tp = bench_throughput(
            args.inflight, args.rounds, args.duration, args.warmup, args.max_calls, args.alternate
        )
        print(f"2. first call with no instance, {args.reps} reps per path", flush=True)
        first = bench_first_calls(args.reps, args.settle)
        print(f"3. balancer picks and registry lookups, {N_ENDPOINTS} endpoints", flush=True)
        micro = bench_micro(args.repeat)
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    body = report(tp, args.inflight, first, micro, args, argv, time.monotonic() - started)
    print()
    print(body)
    print(f"no process left behind ({len(TRACKER.seen)} tracked)")
    if not args.no_write:
        write_section(body, HEADING)
        print(f"wrote the {HEADING!r} section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
