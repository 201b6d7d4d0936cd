"""etcd benchmark: hsu-plugin-etcd on a real 3-member etcd cluster.

Run with ``python bench/etcd.py`` (hsu, hsu-echo and hsu-plugin-etcd
installed; Debian's etcd on PATH or at /usr/bin/etcd). It starts a 3-member
etcd cluster on loopback ports in a temporary directory and measures:

- **registration -> visible**: three ``etcd`` registries (nodes a, b, c, in
  this process); ``--registrations`` endpoints are put one at a time on a,
  each timed until b's and c's local copies list it (their watches);
- **singleton failover**: three ``hsu run`` kernels with a ``placement:
  singleton`` unit; the leader's kernel and its HSU are SIGKILLed, timed until
  another kernel's instance of the unit runs, against ``leader_ttl``; twice;
- **routed calls**: ``Echo`` calls through kernel a's gateway (a plain
  grpc.aio stub, ``--inflight`` at a time, for ``--seconds``), first to an
  instance a runs itself, then to one only kernel b runs (a's registry lists
  it through etcd). Both kernels are on this machine: the ratio shows what
  routing to another kernel's instance costs, not a network between hosts;
- **routed calls across hosts** (root, ``ip``): three network namespaces
  joined by a bridge, etcd on the bridge, every kernel with
  ``kernel.advertise`` and ``kernel.cluster_key``: calls through kernel
  x-a to the instance only x-b runs on another host, against calls through
  x-l to its own instance on its host, alternating.

It replaces the ``## etcd`` section of ``docs/benchmarks.md`` unless
``--no-write``. Every process it starts is stopped by pid; the run fails if
one is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from _common import DOC, RUN_MARK, TRACKER, interrupted, reap_leftovers, versions, write_section
from hsu_plugin_etcd.cluster import LocalCluster, etcd_executable
from hsu_plugin_etcd.registry import EtcdRegistry
from hsu_plugin_etcd.settings import EtcdSettings

from hsu.ports import Endpoint
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

HEADING = "## etcd"
ECHO = "hsu.echo.v1.Echo"
FAST = {"leader_ttl": 3, "loop_wait": 0.5, "retry_timeout": 1.0, "ttl": 3}


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


# -- registration -> visible ------------------------------------------------------------


async def registrations(cluster: LocalCluster, n: int) -> list[float]:
    regs = [
        EtcdRegistry(EtcdSettings(endpoints=tuple(cluster.endpoints), ttl=10), node)
        for node in ("a", "b", "c")
    ]
    a, *others = regs
    arrived: dict[str, dict[int, float]] = {r.node: {} for r in others}
    loop = asyncio.get_running_loop()
    seen = asyncio.Event()
    tasks = []
    try:
        for r in others:
            _, rev = await r.snapshot()

            async def follow(r: EtcdRegistry = r, rev: int = rev) -> None:
                async for ev in r.watch(rev):
                    if ev.kind == "put":
                        arrived[r.node][int(ev.endpoint.instance_id.split("-")[1])] = loop.time()
                        seen.set()

            tasks.append(asyncio.ensure_future(follow()))
        await a.snapshot()
        took = []
        for i in range(n):
            began = loop.time()
            await a.put(Endpoint(f"bench-{i}", "bench", f"127.0.0.1:{10000 + i}", (ECHO,)))

            async def visible(i: int = i) -> None:
                while not all(i in arrived[r.node] for r in others):
                    seen.clear()
                    await seen.wait()

            try:
                await asyncio.wait_for(visible(), 10)
            except TimeoutError:
                raise RuntimeError(f"registration {i} not visible on every node in 10 s") from None
            took.append(max(arrived[r.node][i] for r in others) - began)
        return took
    finally:
        for t in tasks:
            t.cancel()
        for r in regs:
            await r.close()


# -- kernels ----------------------------------------------------------------------------


class Kernel:
    def __init__(
        self,
        name: str,
        cluster: LocalCluster,
        tmp: Path,
        units: dict[str, Any],
        prefix: str = "/hsu/v1",
        kernel: dict[str, Any] | None = None,
        wrap: Any = None,
    ) -> None:
        self.name = name
        path = tmp / f"{name}.yaml"
        path.write_text(
            json.dumps(
                {
                    "name": name,
                    "plugins": ["etcd"],
                    "kernel": {"registry": "etcd", "drain_grace": 1, **(kernel or {})},
                    "etcd": {
                        "endpoints": cluster.endpoints,
                        "node": name,
                        "prefix": prefix,
                        **FAST,
                    },
                    "units": units,
                }
            )
        )
        self.control = f"unix:{tmp / name}.sock"
        self.data = f"unix:{tmp / name}.data.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
        env |= {"HSU_DISABLE_PLUGIN_AUTOLOAD": "1", "HSU_BENCH_RUN": RUN_MARK}
        env["HSU_RUNTIME_DIR"] = str(tmp)
        self.log = (tmp / f"{name}.log").open("w")
        argv = [sys.executable, "-m", "hsu", "run", str(path), "--control", self.control,
                "--address", self.data]  # fmt: skip
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip
        TRACKER.add([self.proc.pid])

    def wait_ready(self, timeout: float = 60) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.control) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kernel {self.name} exited")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                time.sleep(0.05)
        raise RuntimeError(f"kernel {self.name} not SERVING in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def processes_of(unit: str) -> list[tuple[int, int]]:
    """(pid, kernel pid) of live HSUs of ``unit`` started by this run."""
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("HSU_UNIT") == unit:
                out.append((p.pid, p.ppid()))
                TRACKER.add([p.pid])
    return out


def failovers(cluster: LocalCluster, tmp: Path, rounds: int) -> list[float]:
    unit = {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "placement": "singleton",
        "stop_grace": 0.5,
        "routing": {"drain_timeout": 0.2},
    }
    kernels = [Kernel(f"s{i}", cluster, tmp, {"single": unit}) for i in range(rounds + 1)]
    took = []
    try:
        for k in kernels:
            k.wait_ready()
        for _ in range(rounds):
            deadline = time.monotonic() + 30
            while len(now := processes_of("single")) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            [(pid, kernel_pid)] = now
            killed = time.monotonic()
            os.kill(kernel_pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            deadline = killed + 30
            while time.monotonic() < deadline:
                new = [p for p in processes_of("single") if p[0] != pid]
                if new:
                    took.append(time.monotonic() - killed)
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError("no failover in 30 s")
        return took
    finally:
        for k in kernels:
            k.stop()


async def calls_per_second(address: str, seconds: float, inflight: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Echo(echo_pb2.EchoRequest(message="warm"), timeout=30)
        done = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=10)
                done += 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        return done / (time.monotonic() - began)


def routed(
    cluster: LocalCluster, tmp: Path, seconds: float, inflight: int, rounds: int
) -> dict[str, list[float]]:
    """Three kernels up at once: ``r-local`` runs its own instance (alone under
    its own key prefix); ``r-a`` runs none and routes to the one ``r-b`` runs.
    Calls through each gateway alternate, ``rounds`` times, so both see the
    same background load."""
    echo = {"command": ["python", "-m", "hsu_echo"], "interfaces": [ECHO]}
    at_start = {"echo": {**echo, "start": "at-start"}}
    local = Kernel("r-local", cluster, tmp, at_start, prefix="/hsu/bench-local")
    b = Kernel("r-b", cluster, tmp, at_start)
    a = Kernel("r-a", cluster, tmp, {"echo": echo})
    out: dict[str, list[float]] = {"local": [], "remote": []}
    try:
        for k in (local, b, a):
            k.wait_ready()
        time.sleep(0.5)
        for _ in range(rounds):
            for name, k in (("local", local), ("remote", a)):
                out[name].append(asyncio.run(calls_per_second(k.data, seconds, inflight)))
        if [p for p in processes_of("echo") if p[1] == a.proc.pid]:
            raise RuntimeError("kernel r-a started its own instance: not a remote route")
    finally:
        for k in (a, b, local):
            k.stop()
    return out


def across_hosts(
    tmp: Path, seconds: float, inflight: int, rounds: int
) -> dict[str, list[float]] | str:
    """Three hosts (network namespaces joined by a bridge, veth pairs; an etcd
    cluster on the bridge), every kernel with ``kernel.advertise`` (its
    host's address) and the same ``kernel.cluster_key``: ``x-a`` on host 0
    runs no instance and routes to the one ``x-b`` runs on host 1 (over the
    veth pairs and the bridge); ``x-l`` on host 2 runs its own instance
    (alone under its own key prefix), called on its own host. Calls through
    each gateway alternate, ``rounds`` times. A string: why it could not run."""
    from hsu_plugin_etcd import netns

    why = netns.available()
    if why is not None:
        return why
    hosts = netns.Hosts(3)
    cluster: LocalCluster | None = None
    kernels: list[Kernel] = []
    out: dict[str, list[float]] = {"one host": [], "across hosts": []}
    try:
        hosts.create()
        cluster = LocalCluster(tmp / "etcd-bridge", 3, hosts=[hosts.gateway] * 3)
        cluster.start()
        TRACKER.add([m.proc.pid for m in cluster.members if m.proc])
        key = tmp / "cluster.key"
        key.write_text(os.urandom(24).hex())
        key.chmod(0o600)
        echo = {"command": ["python", "-m", "hsu_echo"], "interfaces": [ECHO]}
        at_start = {"echo": {**echo, "start": "at-start"}}
        for name, i, units, prefix in (
            ("x-l", 2, at_start, "/hsu/bench-one-host"),
            ("x-b", 1, at_start, "/hsu/v1"),
            ("x-a", 0, {"echo": echo}, "/hsu/v1"),
        ):
            settings = {"advertise": hosts.addresses[i], "cluster_key": "${file:cluster.key}"}
            kernels.append(
                Kernel(name, cluster, tmp, units, prefix, settings, lambda a, i=i: hosts.argv(i, a))
            )
        for k in kernels:
            k.wait_ready()
        local, _, a = kernels
        time.sleep(0.5)
        for _ in range(rounds):
            for name, k in (("one host", local), ("across hosts", a)):
                out[name].append(asyncio.run(calls_per_second(k.data, seconds, inflight)))
        if [p for p in processes_of("echo") if p[1] == a.proc.pid]:
            raise RuntimeError("kernel x-a started its own instance: not a call across hosts")
    finally:
        for k in reversed(kernels):
            k.stop()
        if cluster is not None:
            cluster.stop()
        left = hosts.remove()
        if left or hosts.exists():
            raise RuntimeError(f"network namespaces or links left: {left}")
    return out


def med(xs: list[float]) -> float:
    return quantile(xs, 0.5)


def spread(xs: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in xs)


def report(
    reg: list[float],
    fo: list[float],
    calls: dict[str, list[float]],
    hosts: dict[str, list[float]] | str,
    args: Any,
    took: float,
) -> str:
    v = versions("hsu", "grpcio", "aetcd")
    exe = etcd_executable() or "etcd"
    etcd_version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    etcd_version = etcd_version.stdout.splitlines()[0]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ms = [x * 1000 for x in reg]
    ttl = FAST["leader_ttl"]
    lines = [
        HEADING,
        "",
        f"Measured {when} by `python bench/etcd.py` ({took:.0f} s; as root, for the network"
        f" namespaces of the cross-host figure). Machine: {os.cpu_count()}"
        f" CPUs, {platform.machine()}, Python {platform.python_version()}. Versions: hsu"
        f" {v['hsu']}, grpcio {v['grpcio']}, aetcd {v['aetcd']}, {etcd_version}; a 3-member"
        " cluster on loopback.",
        "",
        f"**Registration -> visible** ({len(reg)} registrations, one at a time, put on node a,"
        " until nodes b and c list it; three registries in one process):"
        f" p50 {quantile(ms, 0.5):.2f} ms, p99 {quantile(ms, 0.99):.2f} ms,"
        f" max {max(ms):.2f} ms.",
        "",
        f"**Singleton failover** (three `hsu run` kernels; SIGKILL of the leader's kernel and"
        f" its HSU until another kernel's instance runs; leader_ttl {ttl} s, loop_wait"
        f" {FAST['loop_wait']} s, retry_timeout {FAST['retry_timeout']} s; target <= TTL + 1 s):"
        + "".join(f" {x:.2f} s ({x - ttl:+.2f} s vs TTL);" for x in fo).rstrip(";")
        + ".",
        "",
        f"**Routed calls** ({len(calls['local'])} rounds of {args.seconds:g} s each, alternating;"
        f" {args.inflight} in flight, plain grpc.aio stub to a kernel's gateway): through a"
        f" kernel to its own instance {med(calls['local']):,.0f} calls/s (median; rounds"
        f" {spread(calls['local'])}); through a kernel to the instance only another kernel"
        f" runs, listed through etcd, {med(calls['remote']):,.0f} calls/s (rounds"
        f" {spread(calls['remote'])}): **{med(calls['remote']) / med(calls['local']):.2f}x**."
        " The three kernels run at once on this machine (loopback), so both see the same"
        " load: this is the cost of routing to another kernel's instance, not of a network"
        " between hosts (that is the next figure).",
        "",
    ]
    if isinstance(hosts, str):
        lines.append(f"**Routed calls across hosts**: not measured ({hosts}).")
    else:
        one, across = med(hosts["one host"]), med(hosts["across hosts"])
        lines.append(
            f"**Routed calls across hosts** (three network namespaces joined by a bridge,"
            f" veth pairs; etcd on the bridge; every kernel with `kernel.advertise` and"
            f" `kernel.cluster_key`, so every call carries and is checked for its"
            f" `hsu-peer` proof; {len(hosts['one host'])} rounds of {args.seconds:g} s"
            f" each, alternating; {args.inflight} in flight): through a kernel to the"
            f" instance on its own host {one:,.0f} calls/s (median; rounds"
            f" {spread(hosts['one host'])}); through a kernel to the instance only a"
            f" kernel on another host runs {across:,.0f} calls/s (rounds"
            f" {spread(hosts['across hosts'])}): **{across / one:.2f}x** (target >= 0.9x;"
            " the veth pairs and the bridge are the only difference)."
        )
    lines += [
        "",
        "The machine is shared with other jobs: figures vary between runs; each ratio"
        " compares rounds that alternated in the same run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registrations", type=int, default=200)
    ap.add_argument("--failovers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    failed: BaseException | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="hsu-bench-etcd-") as tmp_name:
            tmp = Path(tmp_name)
            cluster = LocalCluster(tmp / "etcd", 3)
            try:
                cluster.start()
                TRACKER.add([m.proc.pid for m in cluster.members if m.proc])
                print("registration -> visible ...", flush=True)
                reg = asyncio.run(registrations(cluster, args.registrations))
                print("singleton failover ...", flush=True)
                fo = failovers(cluster, tmp, args.failovers)
                print("routed calls ...", flush=True)
                calls = routed(cluster, tmp, args.seconds, args.inflight, args.rounds)
            finally:
                cluster.stop()
            print("routed calls across hosts ...", flush=True)
            hosts = across_hosts(tmp, args.seconds, args.inflight, args.rounds)
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    text = report(reg, fo, calls, hosts, args, time.monotonic() - started)
    print()
    print(text)
    if not args.no_write:
        write_section(text, HEADING)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
