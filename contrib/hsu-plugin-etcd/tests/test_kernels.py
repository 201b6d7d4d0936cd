"""Real kernels sharing the ``etcd`` registry through a real 3-member cluster:
a routed call on one kernel reaches an instance only another kernel runs, and
a kernel that stops takes its entries out of every kernel's routes."""

from __future__ import annotations

import asyncio
from typing import Any

import hsu_plugin_etcd
import pytest
from hsu_plugin_etcd.cluster import LocalCluster

import hsu
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = "hsu.echo.v1.Echo"


def deployment(name: str, cluster: LocalCluster, start: str) -> dict[str, Any]:
    return {
        "name": name,
        "kernel": {"registry": "etcd"},
        "etcd": {"endpoints": cluster.endpoints, "node": name, "ttl": 4},
        "units": {
            "echo": {
                "command": ["python", "-m", "hsu_echo"],
                "interfaces": [ECHO],
                "start": start,
            }
        },
    }


async def test_a_call_on_one_kernel_reaches_the_instance_another_kernel_runs(
    etcd_cluster: LocalCluster, hsu_kernel_factory: Any
) -> None:
    b = await hsu_kernel_factory(
        deployment("b", etcd_cluster, "at-start"), plugins=[hsu_plugin_etcd]
    )
    [inst] = [i for i in b.instances.values() if i.state.value == "ready"]
    a = await hsu_kernel_factory(
        deployment("a", etcd_cluster, "on-demand"), plugins=[hsu_plugin_etcd]
    )
    assert a.registry is not None and type(a.registry).__name__ == "EtcdRegistry"
    # a's copy of the registry lists b's instance
    for _ in range(500):
        if [e.instance_id for e in await a.registry.lookup(ECHO)] == [inst.instance_id]:
            break
        await asyncio.sleep(0.02)
    assert [e.instance_id for e in await a.registry.lookup(ECHO)] == [inst.instance_id]
    async with hsu.connect(a.control_address) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        for n in range(5):
            reply = await echo.Echo(echo_pb2.EchoRequest(message=f"m{n}"), timeout=10)
            assert (reply.instance_id, reply.pid) == (inst.instance_id, inst.pid)
    # a started nothing of its own: b's instance was routable
    assert not a.instances
    # b stops: its lease is revoked, and a's registry forgets the instance
    await b.stop("test")
    for _ in range(500):
        if not await a.registry.lookup(ECHO):
            break
        await asyncio.sleep(0.02)
    assert await a.registry.lookup(ECHO) == []


@pytest.mark.parametrize(
    ("endpoints", "why"),
    [
        ([], "no etcd endpoint given"),
        (["nohost"], "'nohost' is not host:port"),
        (["a.example:2379", "b.example:2379"], "several endpoints must be IP addresses"),
    ],
)
def test_bad_endpoints_are_a_config_error_naming_the_field(endpoints: list[str], why: str) -> None:
    from hsu.errors import ConfigError
    from hsu.testing import build_kernel

    with pytest.raises(ConfigError) as info:
        build_kernel(
            {"kernel": {"registry": "etcd"}, "etcd": {"endpoints": endpoints}},
            plugins=[hsu_plugin_etcd],
        )
    assert "etcd.endpoints: " in str(info.value) and why in str(info.value)
