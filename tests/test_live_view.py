"""The live view (issue 16): ``hsu status``'s usage columns and ``hsu top``,
run as real commands against a real kernel (in the test's process, serving
on its loop while the command runs) with a real echo HSU."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

import grpc
import pytest

from hsu._kernel.cli_live import quantile, table
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
UNIT = {
    "command": ["python", "-m", "hsu_echo"],
    "interfaces": [ECHO],
    "startup_timeout": 20,
    "stop_grace": 5,
}


async def hsu(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hsu",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_status_shows_uptime_restarts_rss_cpu_and_inflight_aligned(
    hsu_kernel_factory: Any,
) -> None:
    kernel = await hsu_kernel_factory(
        {"units": {"echo": {**UNIT, "min_instances": 2, "max_instances": 2}}}
    )
    out = await hsu("status", "--control", kernel.control_address)
    lines = out.splitlines()
    header = next(line for line in lines if "INSTANCE" in line)
    for column in ("UPTIME", "RESTARTS", "RSS", "CPU%", "INFLIGHT"):
        assert column in header
    rows = [line for line in lines if line.strip().startswith("echo-")]
    assert len(rows) == 2
    # aligned: every row's RSS column ends where the header's does
    end = header.index("RSS") + len("RSS")
    for row in rows:
        assert row[end - 1] != " " and (len(row) == end or row[end] == " ")
        assert "MiB" in row and "ready" in row
    data = json.loads(await hsu("status", "--control", kernel.control_address, "--json"))
    for inst in data["instances"]:
        used = data["usage"][inst["instance_id"]]
        assert used["rss"] > 0 and used["uptime"] >= 0 and used["inflight"] == 0


async def test_top_shows_calls_per_second_and_p99_per_unit(hsu_kernel_factory: Any) -> None:
    kernel = await hsu_kernel_factory({"units": {"echo": UNIT}})
    stop = asyncio.Event()

    async def load() -> int:
        n = 0
        async with grpc.aio.insecure_channel(kernel.address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            while not stop.is_set():
                await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=20)
                n += 1
        return n

    task = asyncio.ensure_future(load())
    try:
        out = await hsu("top", "--control", kernel.control_address, "-n", "2", "--interval", "1")
    finally:
        stop.set()
        await task
    screens = out.split("hsu top - ")
    assert len(screens) == 3  # two refreshes
    second = screens[2].splitlines()
    header = next(line for line in second if line.startswith("UNIT"))
    assert "CALLS/S" in header and "P99" in header
    (row,) = [line for line in second if line.startswith("echo ")]
    cells = row.split()
    rate = float(cells[header.split().index("CALLS/S")])
    p99 = cells[header.split().index("P99")]
    assert rate > 0
    assert p99.endswith("ms")
    # what top asks for: the kernel's own series (the gateway's), no HSU's
    from hsu._kernel.cli_live import CALLS
    from hsu.core.v1 import core_pb2, core_pb2_grpc

    async with grpc.aio.insecure_channel(kernel.control_address) as channel:
        core = core_pb2_grpc.CoreStub(channel)

        async def instances(local: bool) -> set[str]:
            request = core_pb2.MetricsRequest(families=list(CALLS), local=local)
            reply = await core.Metrics(request, timeout=10)
            assert {f.name for f in reply.families} == set(CALLS)
            return {
                lb.value
                for f in reply.families
                for p in f.points
                for lb in p.labels
                if lb.name == "hsu_instance"
            }

        assert await instances(local=True) == set()
        assert await instances(local=False) == {i.instance_id for i in kernel.instances.values()}


def test_table_sizes_columns_to_their_data_and_quantile_interpolates() -> None:
    lines = table(("A", "NUMBER"), [("long-name", "1"), ("x", "12345678")], {1})
    assert lines == ["A            NUMBER", "long-name         1", "x          12345678"]
    # 100 calls: 90 under 0.01 s, 10 under 0.1 s: p99 is in the second bucket
    after = [[0.01, 90], [0.1, 100], [math.inf, 100]]
    q = quantile(0.99, None, after)
    assert q is not None and 0.01 < q <= 0.1
    # only what came since the previous read counts
    assert quantile(0.5, [[0.01, 90], [0.1, 90], [math.inf, 90]], after) == pytest.approx(0.055)
