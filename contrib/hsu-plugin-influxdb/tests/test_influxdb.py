"""hsu-plugin-influxdb against a real influxd 1.x (Debian's influxdb), started
here on loopback ports with its own config and data in tmp_path: the points
of routed calls are queried back; with the server down the buffer stays
bounded, drops are counted, the kernel keeps serving, and the buffered lines
arrive once the server is up."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from hsu.metrics import Family, Point
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugin_influxdb import lines

INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"
ECHO = "hsu.echo.v1.Echo"
UNIT = {
    "command": ["python", "-m", "hsu_echo"],
    "interfaces": [ECHO],
    "startup_timeout": 20,
    "stop_grace": 5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need_influxd() -> None:
    if not os.access(INFLUXD, os.X_OK):
        if os.environ.get("HSU_REQUIRE_INFLUXDB") == "1":
            pytest.fail(f"HSU_REQUIRE_INFLUXDB=1 but {INFLUXD} is not installed")
        pytest.skip("influxd is not installed (Debian package influxdb)")


class Influxd:
    """A real influxd 1.x on loopback, its config and data under ``tmp``."""

    def __init__(self, tmp: Path, port: int | None = None):
        self.port = port or free_port()
        d = tmp / f"influxd-{self.port}"
        d.mkdir(exist_ok=True)
        self.dir = d
        config = d / "influxdb.conf"
        config.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{free_port()}"\n'
            f'[meta]\n  dir = "{d}/meta"\n'
            f'[data]\n  dir = "{d}/data"\n  wal-dir = "{d}/wal"\n'
            "[monitor]\n  store-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
        )
        self.log = (d / "log").open("w")
        self.proc = subprocess.Popen(
            [INFLUXD, "run", "-config", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def _post(self, q: str, db: str = "") -> dict[str, Any]:
        data = urllib.parse.urlencode({"q": q, **({"db": db} if db else {})}).encode()
        with urllib.request.urlopen(f"{self.url}/query", data=data, timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def wait_ready(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                    if r.status == 204:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"influxd did not start: {(self.dir / 'log').read_text()}")
            time.sleep(0.2)

    def create(self, db: str) -> None:
        self._post(f'CREATE DATABASE "{db}"')

    def query(self, q: str, db: str) -> list[dict[str, Any]]:
        try:
            result = self._post(q, db)
        except (OSError, urllib.error.URLError):
            return []
        series: list[dict[str, Any]] = result["results"][0].get("series", [])
        return series

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


async def _until_rows(
    influx: Influxd, q: str, db: str, check: Any, seconds: float = 60.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        series = await asyncio.to_thread(influx.query, q, db)
        if series and check(series):
            return series
        if time.monotonic() > deadline:
            raise AssertionError(f"influxdb: {q} never satisfied; last {series}")
        await asyncio.sleep(0.3)


def _exporter(kernel: Any) -> Any:
    (exporter,) = [e for n, e in kernel.metrics_hub._exporters if n == "influxdb"]
    return exporter


def test_line_protocol_escapes_and_shapes_histograms() -> None:
    fams = [
        Family("c_total", "counter", "", (Point((("a b", "x,y"), ("e", "")), 2.0),)),
        Family(
            "h_seconds",
            "histogram",
            "",
            (Point((("k", "v"),), 0.5, ((0.1, 1), (math.inf, 2)), 2),),
        ),
        Family("g", "gauge", "", (Point((), math.nan),)),
    ]
    got = lines(fams, 7, {"host": "h1"})
    assert got == [
        r"c_total,host=h1,a\ b=x\,y value=2.0 7",
        r"h_seconds,host=h1,k=v count=2i,sum=0.5,0.1=1i,+Inf=2i 7",
    ]


@pytest.mark.integration
async def test_points_of_routed_calls_reach_a_real_influxdb(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    _need_influxd()
    influx = Influxd(tmp_path)
    try:
        await asyncio.to_thread(influx.wait_ready)
        await asyncio.to_thread(influx.create, "hsu")
        kernel = await hsu_kernel_factory(
            {
                "kernel": {"exporters": ["influxdb"]},
                "influxdb": {"url": influx.url, "interval": 0.3, "tags": {"site": "test"}},
                "units": {"echo": UNIT},
            },
            names=["influxdb"],
        )
        async with grpc.aio.insecure_channel(kernel.address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for i in range(4):
                await stub.Echo(echo_pb2.EchoRequest(message=f"m{i}"), timeout=20)
        # the latest point of each series: the last write's values
        # the gateway's series (the HSU's own count has an hsu_instance tag)
        q = (
            'SELECT last("value") FROM "grpc_server_handled_total"'
            " WHERE \"grpc_method\" = 'Echo' AND \"hsu_instance\" = '' GROUP BY *"
        )
        series = await _until_rows(
            influx, q, "hsu", lambda s: sum(r["values"][0][1] for r in s) == 4.0
        )
        for s in series:
            assert s["tags"]["grpc_service"] == ECHO and s["tags"]["site"] == "test"
        states = await _until_rows(
            influx,
            'SELECT last("value") FROM "hsu_instances" WHERE "state" = \'ready\' GROUP BY *',
            "hsu",
            lambda s: s[0]["values"][0][1] == 1.0,
        )
        assert states[0]["tags"]["hsu_unit"] == "echo"
        hist = await _until_rows(
            influx,
            'SELECT last("count") FROM "grpc_server_handling_seconds"'
            " WHERE \"hsu_instance\" = '' GROUP BY *",
            "hsu",
            lambda s: sum(r["values"][0][1] for r in s) == 4,
        )
        assert hist
        assert _exporter(kernel).dropped_count == 0
    finally:
        await asyncio.to_thread(influx.stop)


@pytest.mark.integration
async def test_with_the_server_down_the_buffer_is_bounded_and_drops_are_counted(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    _need_influxd()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"exporters": ["influxdb"]},
            "influxdb": {"url": url, "interval": 0.1, "max_lines": 40, "timeout": 1},
            "units": {"echo": UNIT},
        },
        names=["influxdb"],
    )
    exporter = _exporter(kernel)
    for _ in range(300):  # at most 30 s
        if exporter.dropped_count:
            break
        await asyncio.sleep(0.1)
    assert exporter.dropped_count > 0
    assert len(exporter._buffer) <= 40
    # the kernel went on serving while nothing could be written
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="still here"), timeout=20
        )
    assert reply.message == "still here"
    page = {f.name: f for f in kernel.metrics.collect()}
    assert page["hsu_influxdb_dropped_lines_total"].points[0].value == exporter.dropped_count
    # the server comes up: what is buffered is written
    influx = Influxd(tmp_path, port)
    try:
        await asyncio.to_thread(influx.wait_ready)
        await asyncio.to_thread(influx.create, "hsu")
        await _until_rows(
            influx,
            'SELECT last("value") FROM "hsu_instances" WHERE "state" = \'ready\' GROUP BY *',
            "hsu",
            lambda s: s[0]["values"][0][1] == 1.0,
        )

        # the exporter counts a batch once the server's answer is read,
        # which may be just after the rows are queryable
        def written_lines() -> float:
            family = {f.name: f for f in kernel.metrics.collect()}[
                "hsu_influxdb_written_lines_total"
            ]
            return family.points[0].value if family.points else 0.0

        for _ in range(100):
            if written_lines() > 0:
                break
            await asyncio.sleep(0.1)
        assert written_lines() > 0
    finally:
        await asyncio.to_thread(influx.stop)
