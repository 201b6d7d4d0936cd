"""On-demand starts placed on another kernel: two real kernels share the
``etcd`` registry (a real 3-member cluster); kernel a already runs an
instance (of another unit), kernel b none. A call on a for a unit no kernel
runs yet starts its instance on b with ``kernel.placement: least-loaded``
(a asks b through etcd, b starts it, a's call goes there), and on a itself
with the default ``local-first``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import hsu_plugin_etcd
import pytest
from hsu_plugin_etcd.cluster import LocalCluster

from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = {"command": ["python", "-m", "hsu_echo"], "interfaces": ["hsu.echo.v1.Echo"]}
#: an HSU of another interface (with no methods): what makes kernel a "loaded"
BUSY_HSU = """
import grpc
from hsu import worker

def add(_, server):
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.v1.Busy", {}),))

worker.run(worker.Service(None, add, "test.v1.Busy"))
"""


def deployment(name: str, cluster: LocalCluster, tmp: Path, **kernel: Any) -> dict[str, Any]:
    (tmp / "busy.py").write_text(BUSY_HSU)
    busy = {
        "command": [sys.executable, str(tmp / "busy.py")],
        "interfaces": ["test.v1.Busy"],
        "start": "at-start",
    }
    return {
        "name": name,
        "kernel": {"registry": "etcd", **kernel},
        "etcd": {"endpoints": cluster.endpoints, "node": name, "ttl": 4},
        "units": {"echo": {**ECHO, "start": "on-demand"}, "busy": busy},
    }


@pytest.mark.parametrize(("placement", "starts_on"), [("least-loaded", "b"), (None, "a")])
async def test_an_on_demand_start_goes_where_the_placement_picks(
    etcd_cluster: LocalCluster,
    hsu_kernel_factory: Any,
    tmp_path: Path,
    placement: str | None,
    starts_on: str,
) -> None:
    b_raw = deployment("b", etcd_cluster, tmp_path)
    del b_raw["units"]["busy"]  # b runs nothing
    b = await hsu_kernel_factory(b_raw, plugins=[hsu_plugin_etcd])
    extra = {"placement": placement} if placement else {}
    a_raw = deployment("a", etcd_cluster, tmp_path, **extra)
    a = await hsu_kernel_factory(a_raw, plugins=[hsu_plugin_etcd])
    assert [i.unit for i in a.instances.values()] == ["busy"] and not b.instances
    # a knows both kernels, b with none of the instances a has (once a's own
    # entry came back through its watch)
    for _ in range(500):
        nodes = {n.name: n for n in await a.registry.nodes()}
        if set(nodes) == {"a", "b"} and nodes["a"].instances == 1:
            break
        await asyncio.sleep(0.02)
    assert set(nodes) == {"a", "b"} and nodes["a"].local and not nodes["b"].local
    assert "echo" in nodes["b"].units
    assert (nodes["a"].instances, nodes["b"].instances) == (1, 0)
    async with a.connect() as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="cold"), timeout=30
        )
    kernels = {"a": a, "b": b}
    [echo] = [i for k in kernels.values() for i in k.instances.values() if i.unit == "echo"]
    assert echo.instance_id in kernels[starts_on].instances
    assert (reply.instance_id, reply.pid) == (echo.instance_id, echo.pid)
    assert b.registry.cluster.taken == (1 if starts_on == "b" else 0)


async def test_a_reload_announces_the_units_a_kernel_can_start_now(
    etcd_cluster: LocalCluster, hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    import hsu

    raw = deployment("b", etcd_cluster, tmp_path)
    del raw["units"]["busy"]
    b = await hsu_kernel_factory(raw, plugins=[hsu_plugin_etcd])
    # the first lease and announcement are the registry's background work:
    # a kernel runs (and starts) before etcd answered
    for _ in range(500):
        if await b.registry.nodes():
            break
        await asyncio.sleep(0.02)
    assert [n.units for n in await b.registry.nodes()] == [("echo",)]
    raw["units"]["echo2"] = {**raw["units"]["echo"], "interfaces": ["hsu.echo.v1.Other"]}
    await b.reload(hsu.deployment_from_dict(raw, source="<test>", base_dir=str(tmp_path)))
    assert [n.units for n in await b.registry.nodes()] == [("echo", "echo2")]
