"""Footprint and scale (issue 20): hsu side by side with supervisor and circus.

Run with ``nox -s bench`` (supervisor and circus exist only in that session's
virtualenv), or ``python bench/footprint.py --programs N`` in it. One run
measures, every program ``sleep 1e6``:

1. launch -> N running, one unit (program, watcher) of N, each daemon alone;
   then all three stay up: ``hsu ping``/``hsu status`` (``supervisorctl pid``/
   ``status``, ``circusctl list``/``status``) wall time with N running, and an
   idle window with all three daemons up: RSS and on-CPU time of the daemon;
2. the same with N units of one program each (N ``[program:x]`` sections, N
   watchers);
3. the three daemons with 1 program, plus the dependency floor (a Python that
   imported hsu's required dependencies and sleeps) and the same floor serving
   gRPC as the kernel does (two ``grpc.aio`` servers with grpcio's health
   service), in one idle window;
4. launch -> 10 running, ``--cold`` times each, next to the floor row
   (``bench/launch_floor.py``: the dependencies imported, then 10 ``Popen``).

It prints the results and replaces the ``## Footprint`` section of
``docs/benchmarks.md``. Every daemon runs in its own temporary directory and
is stopped, with every child, by pid; the run fails if any process it started
is still alive.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil
from _common import TRACKER, interrupted, leftovers, versions, write_section
from launch_floor import IMPORTS as DEP_IMPORTS
from supervision import (
    PROGRAM,
    Circus,
    Daemon,
    Floor,
    Hsu,
    Supervisor,
    _bin,
    cpu_seconds,
    wait_until,
)

HEADING = "## Footprint"
CMD = " ".join(PROGRAM)


class HsuShape(Hsu):
    """hsu with one unit of ``n`` (``units == 1``) or ``n`` units of one."""

    def __init__(self, n: int, tag: str, units: int = 1):
        super().__init__(n, tag)
        self.units = units

    def write_config(self, change: str = "") -> None:
        """``change``: lines added to the middle unit (for the reloads)."""
        per = self.n // self.units
        body = "".join(
            f"  s{i}:\n    kind: managed\n    command: [{', '.join(PROGRAM)}]\n"
            f"    start: at-start\n    min_instances: {per}\n    max_instances: {per}\n"
            + (change if i == self.units // 2 else "")
            for i in range(self.units)
        )
        text = f"name: bench\nkernel:\n  address: {self.address}\nunits:\n{body}"
        (self.dir / "deployment.yaml").write_text(text)

    def cli(self, *args: str) -> list[str]:
        return [_bin("hsu"), *args, "--control", self.control]


class SupervisorShape(Supervisor):
    def __init__(self, n: int, tag: str, units: int = 1):
        super().__init__(n, tag)
        self.units = units

    def write_config(self) -> None:
        if self.units == 1:
            super().write_config()
            return
        d = self.dir
        programs = "".join(f"[program:s{i}]\ncommand = {CMD}\n\n" for i in range(self.units))
        (d / "supervisord.conf").write_text(
            f"[unix_http_server]\nfile = {self.sock}\n\n"
            f"[supervisord]\nnodaemon = true\nlogfile = {d}/supervisord.log\n"
            f"pidfile = {d}/supervisord.pid\nchildlogdir = {d}\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl = unix://{self.sock}\n\n{programs}"
        )

    def cli(self, *args: str) -> list[str]:
        return [_bin("supervisorctl"), "-c", str(self.dir / "supervisord.conf"), *args]


class CircusShape(Circus):
    def __init__(self, n: int, tag: str, units: int = 1):
        super().__init__(n, tag)
        self.units = units

    def write_config(self) -> None:
        if self.units == 1:
            super().write_config()
            return
        watchers = "".join(
            f"[watcher:s{i}]\ncmd = {CMD}\nnumprocesses = 1\n\n" for i in range(self.units)
        )
        (self.dir / "circus.ini").write_text(
            f"[circus]\nendpoint = {self.endpoint}\npubsub_endpoint = {self.pubsub}\n\n{watchers}"
        )

    def cli(self, *args: str) -> list[str]:
        return [_bin("circusctl"), "--endpoint", self.endpoint, *args]


KINDS: list[type[Daemon]] = [HsuShape, SupervisorShape, CircusShape]
#: the read commands timed with N running: (ping-like, status-like)
READS = {
    "hsu": (("ping",), ("status",)),
    "supervisor": (("pid",), ("status",)),
    "circus": (("list",), ("status",)),
}


#: the dependency floor serving gRPC as the kernel does: grpcio's health
#: service on two ``grpc.aio`` servers, the control plane's on a unix socket and
#: the data plane's on a loopback port, then an idle event loop
GRPC_SERVERS = """
import asyncio, tempfile
from grpc_health.v1 import health, health_pb2_grpc

async def serve(where):
    servers = []
    for address in (f"unix:{where}/control.sock", "127.0.0.1:0"):
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(address)
        await server.start()
        servers.append(server)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(flush=True)
    await stop.wait()
    for server in servers:
        await server.stop(None)

with tempfile.TemporaryDirectory() as where:
    asyncio.run(serve(where))
"""


class DepFloor:
    """A Python that imported hsu's required dependencies and waits: the
    memory no daemon built on them can go below. With ``servers``, it also
    serves gRPC as the kernel does (:data:`GRPC_SERVERS`): what no daemon
    that serves gRPC through grpcio can go below, in memory or idle CPU."""

    def __init__(self, servers: bool = False) -> None:
        self.name = "floor+grpc" if servers else "floor"
        code = "import signal, " + ", ".join(DEP_IMPORTS)
        code += GRPC_SERVERS if servers else "; print(flush=True); signal.pause()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        TRACKER.add([self.proc.pid])
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # imported

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def settle(daemons: list[Any], window: float) -> dict[str, tuple[int, float]]:
    """Each daemon's (RSS bytes, CPU seconds) over one idle window shared by all."""
    before = {d.name: cpu_seconds(d.pid) for d in daemons}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    out = {}
    for d in daemons:
        cpu = (cpu_seconds(d.pid) - before[d.name]) * window / elapsed
        out[d.name] = (psutil.Process(d.pid).memory_info().rss, cpu)
    return out


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return time.monotonic() - t0


def reload_once(d: HsuShape) -> float:
    """Wall time of one `hsu reload` (it must succeed), then a pause: the
    kernel takes five reloads in a burst, then one a second."""
    t0 = time.monotonic()
    done = subprocess.run(d.cli("reload"), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"hsu reload failed: {done.stderr.strip()}")
    time.sleep(1.0)
    return took


def reloads(d: HsuShape, runs: int) -> tuple[float, float, float | None]:
    """`hsu reload` with nothing changed (median of ``runs``), with the middle
    unit's ``stop_grace`` changed (no new process), and, with one instance
    per unit, with its ``env`` changed too (its one instance restarted)."""
    same = statistics.median(reload_once(d) for _ in range(runs))
    d.write_config("    stop_grace: 3\n")
    grace = reload_once(d)
    env = None
    if d.units > 1:
        d.write_config("    stop_grace: 3\n    env: {CHANGED: '1'}\n")
        env = reload_once(d)
    d.write_config()
    reload_once(d)  # back as it was (its instance restarted once more)
    wait_until(f"hsu: {d.n} running again", lambda: len(d.sleepers.running()) >= d.n, 60, 0.05)
    return same, grace, env


def scale_run(n: int, units: int, window: float, reads: int) -> dict[str, Any]:
    """Launch each daemon alone with ``n`` programs in ``units`` units, keep
    it up; then the read commands, one idle window for all three, hsu's reloads."""
    daemons: list[Any] = [kind(n, f"n{units}", units=units) for kind in KINDS]  # type: ignore[call-arg]
    out: dict[str, Any] = {"launch": {}, "reads": {}, "idle": {}}
    try:
        for d in daemons:
            d.start()
            wait_until(
                f"{d.name}: {n} running", lambda d=d: len(d.sleepers.running()) >= n, 600, 0.02
            )
            out["launch"][d.name] = time.monotonic() - d.t_spawn
            print(f"  {d.name}: {n} running ({units} units) in {out['launch'][d.name]:.2f} s")
        time.sleep(3.0)
        for d in daemons:
            ping, status = READS[d.name]
            out["reads"][d.name] = tuple(
                statistics.median(timed(d.cli(*cmd)) for _ in range(reads))
                for cmd in (ping, status)
            )
        time.sleep(2.0)
        out["idle"] = settle(daemons, window)
        for d in daemons:
            if len(d.sleepers.running()) != n:
                raise RuntimeError(f"{d.name}: lost programs during the idle window")
        for d in daemons:  # after the idle window: a reload's garbage is not its RSS
            if isinstance(d, HsuShape):
                out["reload"] = reloads(d, reads)
    finally:
        for d in daemons:
            t0 = time.monotonic()
            d.stop()
            out.setdefault("stop", {})[d.name] = time.monotonic() - t0
    return out


def one_run(window: float) -> dict[str, tuple[int, float]]:
    daemons: list[Any] = [kind(1, "one") for kind in KINDS]
    floors: list[DepFloor] = []
    try:
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_running(60)
        floors.append(DepFloor())
        floors.append(DepFloor(servers=True))
        time.sleep(2.0)
        return settle([*daemons, *floors], window)
    finally:
        for d in daemons:
            d.stop()
        for floor in floors:
            floor.stop()


def cold(reps: int) -> dict[str, list[float]]:
    kinds: list[type[Daemon]] = [*KINDS, Floor]
    out: dict[str, list[float]] = {}
    for rep in range(reps):
        for kind in kinds[rep % 4 :] + kinds[: rep % 4]:
            d = kind(10, "cold")
            try:
                d.start()
                wait_until(
                    f"{d.name}: 10 running", lambda d=d: len(d.sleepers.running()) >= 10, 30, 0.002
                )
                out.setdefault(d.name, []).append(time.monotonic() - d.t_spawn)
            finally:
                d.stop()
            time.sleep(0.3)
    return out


# -- report ---------------------------------------------------------------------------


def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB"


def msec(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def report(args: argparse.Namespace, r: dict[str, Any], took: float) -> str:
    n = args.programs
    one, big, many = r["one"], r["big"], r["many"]
    tools = ["hsu", "supervisor", "circus"]
    v = versions("hsu", "supervisor", "circus", "grpcio", "psutil")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    w = args.window

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(t) for t in tools) + " |"

    def per(shape: dict[str, Any], t: str) -> float:
        return float(shape["idle"][t][0] - one[t][0]) / (n - 1)

    cold_m = {k: statistics.median(x) for k, x in r["cold"].items()}
    lines = [
        HEADING,
        "",
        f"Measured {when} by `python bench/footprint.py --programs {n} --window {w:g}"
        f" --cold {args.cold} --reads {args.reads}` (in `nox -s bench`, {took:.0f} s). Machine:"
        f" {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, Python"
        f" {platform.python_version()}. Versions: "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + ".",
        "",
        "The machine is small and shared with other work, so timings are noisy; the"
        " three daemons run in one run, idle windows shared by all three. Every program"
        f" is `{CMD}`; hsu runs `managed` units (no registration, no gRPC to them).",
        f"RSS: psutil `memory_info().rss` of the daemon alone at the end of a {w:g} s idle"
        " window. CPU: on-CPU time of all the daemon's threads over that window (from"
        " `/proc/PID/task/*/schedstat`, ns resolution). Per program: (RSS at N - RSS at"
        ' 1) / (N - 1). "One unit of N": one program section / watcher / unit with N'
        ' processes; "N units of one": N of them with one process each. Launch: from'
        " spawning the daemon to every program running (its children's argv polled from"
        " /proc), each daemon launched alone. Read commands: median wall time of"
        f" {args.reads} runs of the CLI (hsu `ping`/`status`, `supervisorctl pid`/`status`,"
        " `circusctl list`/`status`) with N running, one unit of N. Reload (hsu"
        f" only): wall time of `hsu reload` with nothing changed (median of {args.reads}),"
        " then once with the middle unit's `stop_grace` changed, then (N units of one)"
        " once with its `env` changed too, which restarts its one instance.",
        "",
        "| figure | hsu | supervisor | circus |",
        "| --- | ---: | ---: | ---: |",
        row(
            f"daemon RSS, 1 / {n} programs",
            lambda t: f"{mib(one[t][0])} / {mib(big['idle'][t][0])}",
        ),
        row("RSS per program: one unit of N", lambda t: kib(per(big, t))),
        row("RSS per program: N units of one", lambda t: kib(per(many, t))),
        row(f"daemon RSS, {n} units of one", lambda t: mib(many["idle"][t][0])),
        row(f"idle CPU, 1 program (ms per {w:g} s)", lambda t: f"{one[t][1] * 1000:.1f}"),
        row(
            f"idle CPU, {n} programs, one unit (ms per {w:g} s)",
            lambda t: f"{big['idle'][t][1] * 1000:.1f}",
        ),
        row(
            f"idle CPU, {n} units of one (ms per {w:g} s)",
            lambda t: f"{many['idle'][t][1] * 1000:.1f}",
        ),
        row(f"launch -> 10 running (median of {args.cold})", lambda t: msec(cold_m[t])),
        row(f"launch -> {n} running, one unit", lambda t: msec(big["launch"][t])),
        row(f"launch -> {n} running, {n} units", lambda t: msec(many["launch"][t])),
        row(
            f"ping / status CLI, {n} running",
            lambda t: " / ".join(msec(x) for x in big["reads"][t]),
        ),
        row(
            f"ping / status CLI, {n} units", lambda t: " / ".join(msec(x) for x in many["reads"][t])
        ),
        row(f"stop (SIGTERM -> all gone), {n} programs, one unit", lambda t: msec(big["stop"][t])),
        row(f"stop, {n} units of one", lambda t: msec(many["stop"][t])),
        row(
            f"`hsu reload`: nothing / one unit changed, one unit of {n}",
            lambda t: " / ".join(msec(x) for x in big["reload"][:2]) if t == "hsu" else "-",
        ),
        row(
            f"`hsu reload`: nothing / one unit changed / its instance restarted, {n} units",
            lambda t: " / ".join(msec(x) for x in many["reload"]) if t == "hsu" else "-",
        ),
        "",
        f"Floor rows, same run: a Python that imported hsu's required dependencies"
        f" ({', '.join(DEP_IMPORTS)}) holds **{mib(one['floor'][0])}** RSS and used"
        f" {one['floor'][1] * 1000:.1f} ms of CPU in the idle window; the same imports then"
        f" 10 `Popen()` launch 10 running in **{msec(cold_m['floor'])}** (median of {args.cold})."
        f" The same Python serving grpcio's health service on two `grpc.aio` servers, as the"
        f" kernel serves its control and data planes (a unix socket and a loopback port), and"
        f" nothing else, holds **{mib(one['floor+grpc'][0])}** and used"
        f" **{one['floor+grpc'][1] * 1000:.1f} ms** of CPU in the idle window.",
        "",
        "### Targets (issue 20)",
        "",
    ]
    floor_rss = one["floor"][0]
    grpc_rss, grpc_cpu = one["floor+grpc"][0], one["floor+grpc"][1] * 1000
    hsu1 = one["hsu"][0]

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    pb, pbs = per(big, "hsu"), per(big, "supervisor")
    pm, pms = per(many, "hsu"), per(many, "supervisor")
    c1, c1s = one["hsu"][1] * 1000, one["supervisor"][1] * 1000
    cn, cns = big["idle"]["hsu"][1] * 1000, big["idle"]["supervisor"][1] * 1000
    launch_n = big["launch"]["hsu"]
    if n >= 1000:
        thousand = f" {met(launch_n <= 1.5)} ({msec(launch_n)} at {n})"
    else:
        thousand = f" not measured at 1,000 ({msec(launch_n)} at {n})"
    reads = " / ".join(msec(x) for x in big["reads"]["hsu"])
    lines += [
        f"- kernel RSS with 1 instance <= dependency floor + 4 MiB:"
        f" {met(hsu1 <= floor_rss + 4 * 2**20)} ({mib(hsu1)} vs {mib(floor_rss)} + 4 MiB;"
        f" the floor serving gRPC alone {mib(grpc_rss)}, {mib(grpc_rss - floor_rss)} over it).",
        f"- RSS per instance <= supervisor's, one unit of N: {met(pb <= pbs)} ({kib(pb)} vs"
        f" {kib(pbs)}); N units of one: {met(pm <= pms)} ({kib(pm)} vs {kib(pms)}).",
        f"- idle CPU with 1 instance <= supervisor's: {met(c1 <= c1s)} ({c1:.1f} vs"
        f" {c1s:.1f} ms per {w:g} s; the floor serving gRPC alone {grpc_cpu:.1f} ms);"
        f" at {n}: {cn:.1f} ms (supervisor {cns:.1f}).",
        f"- launch -> 10 running <= 1.25x the floor row:"
        f" {met(cold_m['hsu'] <= 1.25 * cold_m['floor'])}"
        f" ({cold_m['hsu'] / cold_m['floor']:.2f}x); launch -> 1,000 running <= 1.5 s:"
        + thousand
        + ".",
        f"- `hsu ping` / `hsu status` <= 100 ms wall: {met(max(big['reads']['hsu']) <= 0.1)}"
        f" ({reads}).",
        f"- {n} units of one within 2x of one unit of {n}: launch"
        f" {many['launch']['hsu'] / launch_n:.2f}x, status"
        f" {many['reads']['hsu'][1] / big['reads']['hsu'][1]:.2f}x, stop"
        f" {many['stop']['hsu'] / big['stop']['hsu']:.2f}x, reload"
        f" {many['reload'][0] / big['reload'][0]:.2f}x (nothing changed) and"
        f" {many['reload'][1] / big['reload'][1]:.2f}x (one unit changed).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", type=int, default=1000, help="N (default 1000)")
    ap.add_argument("--window", type=float, default=20.0, help="idle window, s (default 20)")
    ap.add_argument("--cold", type=int, default=3, help="launches to 10 running per tool")
    ap.add_argument("--reads", type=int, default=5, help="runs of each read command")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    try:
        print(f"footprint: one unit of {args.programs}", flush=True)
        results["big"] = scale_run(args.programs, 1, args.window, args.reads)
        print(f"footprint: {args.programs} units of one", flush=True)
        results["many"] = scale_run(args.programs, args.programs, args.window, args.reads)
        print("footprint: 1 program and the dependency floor", flush=True)
        results["one"] = one_run(args.window)
        print("footprint: launch -> 10 running", flush=True)
        results["cold"] = cold(args.cold)
    finally:
        left = leftovers()
        for p in left:
            print(f"left over: {p.pid} {p.name()}; SIGKILL", file=sys.stderr)
            p.kill()
    if left:
        raise SystemExit(f"{len(left)} processes outlived the run")
    text = report(args, results, time.monotonic() - t0)
    print(text)
    if not args.no_write:
        write_section(text, HEADING, keep=True)


if __name__ == "__main__":
    main()
