"""Storage benchmark: get/put per second over hsu.storage.v1.Storage against
the same operations straight to the store (the floors).

Run with ``python bench/storage.py`` (hsu and hsu-plugin-redis installed;
Debian's redis-server on PATH). It starts one redis-server (no persistence,
``--save '' --appendonly no``) on a loopback port and two ``hsu run``
kernels, one on ``kernel.storage: sqlite`` (its file in a temporary state
dir) and one on ``kernel.storage: redis``, and measures, one operation at a
time (each waits for the one before, as a single caller does):

- **over the service**: ``hsu.storage.StorageClient`` (what an HSU's
  ``worker.storage`` is) calling the kernel's control plane (a unix socket);
  Put then Get of ``--ops`` keys of ``--size`` bytes;
- **the gRPC round trip**: grpc.health.v1 ``Check`` to the same control plane;
- **the floors**: redis-py's asyncio client straight to the same server
  (``SET``/``GET``), and sqlite3 straight to a file with the sqlite storage's
  settings (WAL, ``synchronous=FULL``, one commit per put; ``SELECT``).

Rounds alternate between the four, so all see the same load. It replaces the
``## Storage`` section of ``docs/benchmarks.md`` unless ``--no-write``. Every
process it starts is stopped by pid; the run fails if one is still alive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from _common import DOC, RUN_MARK, TRACKER, interrupted, reap_leftovers, versions, write_section
from hsu_plugin_redis.server import LocalRedis, redis_executable

from hsu.storage import StorageClient

HEADING = "## Storage"
Op = Callable[[int], Awaitable[object]]


def start_kernel(tmp: Path, name: str, extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``hsu run`` on a unix socket in ``tmp``; its control address once SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    d = tmp / name
    d.mkdir(mode=0o700)
    deployment = d / "d.yaml"
    deployment.write_text(f"name: {name}\nunits: {{}}\n{extra}")
    control = f"unix:{d / 'k.sock'}"
    env = {**os.environ, "HSU_BENCH_RUN": RUN_MARK, "HSU_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env["HSU_RUNTIME_DIR"] = str(d)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsu", "run", str(deployment), "--control", control,
         "--address", f"unix:{d / 'data.sock'}"],
        cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=open(d / "kernel.err", "wb"),  # noqa: SIM115
    )  # fmt: skip
    TRACKER.add([proc.pid])
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(control) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kernel {name} exited: {(d / 'kernel.err').read_text()}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, control
            time.sleep(0.05)
    raise TimeoutError(f"kernel {name} not SERVING in 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def rate(op: Op, n: int) -> float:
    """Operations per second, one at a time."""
    t0 = time.perf_counter()
    for i in range(n):
        await op(i)
    return n / (time.perf_counter() - t0)


class SqliteFloor:
    """sqlite3 straight to a file, as the sqlite storage opens it, on one
    thread of its own (as the storage runs its statements off the loop)."""

    def __init__(self, path: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID")

    def _put(self, key: bytes, value: bytes) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))
        self.conn.execute("COMMIT")

    def _get(self, key: bytes) -> object:
        return self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()

    async def put(self, key: bytes, value: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self._put, key, value)

    async def get(self, key: bytes) -> object:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._get, key)

    def close(self) -> None:
        self.conn.close()
        self.pool.shutdown()


async def measure(
    controls: dict[str, str], redis_address: str, tmp: Path, ops: int, size: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    value = os.urandom(size)
    host, port = redis_address.rsplit(":", 1)
    raw = aioredis.Redis(host=host, port=int(port))
    floor = SqliteFloor(tmp / "floor.sqlite3")
    clients = {name: StorageClient(addr) for name, addr in controls.items()}
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.aio.insecure_channel(next(iter(controls.values())))
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest()
    out: dict[str, dict[str, list[float]]] = {}

    def add(name: str, kind: str, x: float) -> None:
        out.setdefault(name, {}).setdefault(kind, []).append(x)

    try:
        for r in range(rounds):
            for name, client in clients.items():
                put = rate(lambda i: client.put("bench", f"r{r}k{i}", value), ops)  # noqa: B023
                add(f"hsu+{name}", "put", await put)
                get = rate(lambda i: client.get("bench", f"r{r}k{i}"), ops)  # noqa: B023
                add(f"hsu+{name}", "get", await get)
            add("grpc", "check", await rate(lambda i: health.Check(check), ops))
            add("redis-py", "put", await rate(lambda i: raw.set(f"f:r{r}k{i}", value), ops))  # noqa: B023
            add("redis-py", "get", await rate(lambda i: raw.get(f"f:r{r}k{i}"), ops))  # noqa: B023
            put = rate(lambda i: floor.put(f"r{r}k{i}".encode(), value), ops)  # noqa: B023
            add("sqlite3", "put", await put)
            add("sqlite3", "get", await rate(lambda i: floor.get(f"r{r}k{i}".encode()), ops))  # noqa: B023
    finally:
        for c in clients.values():
            await c.close()
        await raw.aclose()
        await channel.close()
        floor.close()
    return out


def report(res: dict[str, dict[str, list[float]]], args: argparse.Namespace, took: float) -> str:
    v = versions("hsu", "hsu-plugin-redis", "redis", "grpcio")
    exe = redis_executable() or "redis-server"
    rv = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    redis_version = next((w[2:] for w in rv if w.startswith("v=")), "?")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    med = {k: {op: statistics.median(xs) for op, xs in d.items()} for k, d in res.items()}
    rows = [
        ("sqlite", "hsu+sqlite", "sqlite3"),
        ("redis", "hsu+redis", "redis-py"),
    ]
    lines = [
        HEADING,
        "",
        f"Measured {when} by `python bench/storage.py --ops {args.ops} --rounds {args.rounds}"
        f" --size {args.size}` ({took:.0f} s). Machine: {os.cpu_count()} CPUs,"
        f" {platform.machine()}, Python {platform.python_version()}, shared with other work"
        f" while it ran. Versions: hsu {v['hsu']}, hsu-plugin-redis {v['hsu-plugin-redis']},"
        f" redis-py {v['redis']}, grpcio {v['grpcio']}, redis-server {redis_version} (no"
        f" persistence), SQLite {sqlite3.sqlite_version}.",
        "",
        f"One operation at a time ({args.ops} per round, {args.size}-byte values, median of"
        f" {args.rounds} alternating rounds). Over the service: `hsu.storage.StorageClient`"
        " (an HSU's `worker.storage`) to an `hsu run` kernel's control plane on a unix socket."
        " Floors: redis-py `SET`/`GET` straight to the same redis-server; sqlite3 straight to"
        " a file with WAL, `synchronous=FULL` and one commit per put. Target: within 2x of"
        " the floor.",
        "",
        "| storage | op | over the service (ops/s) | floor (ops/s) | service / floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for store, ours, floor in rows:
        for op in ("put", "get"):
            a, b = med[ours][op], med[floor][op]
            lines.append(f"| {store} | {op} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")
    rpc = med["grpc"]["check"]
    ratios = [med[ours][op] / med[floor][op] for _, ours, floor in rows for op in ("put", "get")]
    met = sum(r >= 0.5 for r in ratios)
    lines += [
        "",
        f"Within 2x of the floor: {met} of {len(ratios)}. A floor in the same process (a"
        " sqlite3 `SELECT` on a thread) costs far less than any round trip to another"
        " process, so over the service no storage gets near it on a get; against redis, whose"
        " floor is a round trip too, the gap is smaller.",
        "",
        f"The gRPC round trip alone (grpc.health.v1 `Check` to the sqlite kernel's control"
        f" plane, the same client and socket): {rpc:,.0f} calls/s. A put over the service is"
        " also a revision, a version, a stream entry for watchers"
        " (redis) or a history row (sqlite) that the floor does not write; a get checks the"
        " caller's namespace. The rest of the gap is the gRPC round trip to the kernel.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    failed: BaseException | None = None
    kernels: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hsu-bench-storage-") as tmp_name:
            tmp = Path(tmp_name)
            server = LocalRedis(tmp / "redis")
            try:
                server.start()
                TRACKER.add([server.proc.pid] if server.proc else [])
                sq, sq_addr = start_kernel(tmp, "sq", "")
                kernels.append(sq)
                rd, rd_addr = start_kernel(
                    tmp,
                    "rd",
                    "plugins: [hsu_plugin_redis]\nkernel: {storage: redis}\n"
                    f"redis: {{address: '{server.address}'}}\n",
                )
                kernels.append(rd)
                print("measuring ...", flush=True)
                res = asyncio.run(
                    measure(
                        {"sqlite": sq_addr, "redis": rd_addr},
                        server.address,
                        tmp,
                        args.ops,
                        args.size,
                        args.rounds,
                    )
                )
            finally:
                for k in kernels:
                    stop(k)
                server.stop()
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    text = report(res, args, time.monotonic() - started)
    print()
    print(text)
    if not args.no_write:
        write_section(text, HEADING)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
