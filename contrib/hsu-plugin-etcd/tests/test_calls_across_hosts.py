"""Calls across hosts: three kernels in three network namespaces, each with
``kernel.advertise`` (its namespace's address) and the same
``kernel.cluster_key``. A call through host A's gateway, and one made with
``hsu.connect`` through A's control plane, reach the instance only host C
runs; that instance refuses a call without the cluster's proof; SIGKILL host
B's kernel and HSU and idempotent calls through A keep succeeding (B's
instance is ejected and the call retried elsewhere) until B's entry leaves
A's registry. An ``advertise`` off loopback without a cluster key is refused.
Every namespace and process is removed afterwards, also on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hsu_plugin_etcd
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hsu_plugin_etcd import netns
from hsu_plugin_etcd.cluster import LocalCluster

import hsu
from hsu import peer
from hsu.errors import ConfigError, HsuError
from hsu.testing import build_kernel
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

from .test_leadership import Kernel, until
from .test_multihost import resolve

KEY = "a-cluster-key-for-the-tests-0123456789"


def echo_unit(start: str) -> dict[str, Any]:
    return {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": ["hsu.echo.v1.Echo"],
        "start": start,
        "routing": {"idempotent": ["Echo"]},
    }


def hsus() -> list[psutil.Process]:
    """Live HSU processes of this test (they name their unit in their env)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and "HSU_UNIT" in p.environ():
                found.append(p)
    return found


@pytest.fixture
def cluster_hosts(
    hosts: netns.Hosts, bridge_etcd: LocalCluster, tmp_path: Path, request: Any
) -> Iterator[list[Kernel]]:
    """Kernels a, b, c on hosts 0, 1, 2; ``request.param``: each one's unit's
    ``start``."""
    (tmp_path / "cluster.key").write_text(KEY)
    os.chmod(tmp_path / "cluster.key", 0o600)
    kernels = []
    try:
        for i, (name, start) in enumerate(zip("abc", request.param, strict=True)):
            kernels.append(
                Kernel(
                    name,
                    bridge_etcd,
                    tmp_path,
                    units={"echo": echo_unit(start)},
                    wrap=lambda a, i=i: hosts.argv(i, a),
                    kernel={"advertise": hosts.addresses[i], "cluster_key": "${file:cluster.key}"},
                )
            )
        for k in kernels:
            k.wait_ready()
        yield kernels
    finally:
        for k in kernels:
            k.stop()
        for p in hsus():  # an HSU of a SIGKILLed kernel, or one left behind
            with contextlib.suppress(psutil.Error):
                p.kill()


def data(kernel: Kernel) -> str:
    return kernel.control.replace(".sock", ".data.sock")


def echo(channel: Any, message: str = "x") -> echo_pb2.EchoResponse:
    reply: echo_pb2.EchoResponse = echo_pb2_grpc.EchoStub(channel).Echo(
        echo_pb2.EchoRequest(message=message), timeout=10
    )
    return reply


@pytest.mark.parametrize("cluster_hosts", [("on-demand", "on-demand", "at-start")], indirect=True)
def test_a_call_from_host_a_reaches_the_instance_only_host_c_runs(
    cluster_hosts: list[Kernel], hosts: netns.Hosts
) -> None:
    a, _, c = cluster_hosts
    until(lambda: len(resolve(a)) == 1, "c's instance in a's registry")
    [c_hsu] = psutil.Process(c.proc.pid).children()
    c_instance = c_hsu.environ()["HSU_INSTANCE_ID"]
    with grpc.insecure_channel(a.control) as ch:
        from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

        [ep] = (
            kernel_pb2_grpc.KernelStub(ch)
            .Resolve(kernel_pb2.ResolveRequest(interface="hsu.echo.v1.Echo"), timeout=5)
            .endpoints
        )
    # c's instance listens on c's advertised address, and is listed so
    assert ep.instance_id == c_instance
    assert ep.address.startswith(f"{hosts.addresses[2]}:")
    # through a's gateway (a's data plane): a signs the call with the cluster key
    with grpc.insecure_channel(data(a)) as ch:
        for n in range(5):
            reply = echo(ch, f"m{n}")
            assert (reply.message, reply.instance_id, reply.pid) == (f"m{n}", c_instance, c_hsu.pid)
    # with hsu.connect through a's control plane: the client calls c's instance itself
    with hsu.connect_sync(a.control, cluster_key=KEY) as ch:
        assert echo(ch).instance_id == c_instance
    # a and b started nothing: c's instance was routable from their hosts
    assert [p.ppid() for p in hsus()] == [c.proc.pid]

    # the instance itself takes no call without the cluster's proof ...
    with grpc.insecure_channel(ep.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            echo(ch)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "hsu-peer" in (info.value.details() or "")
        # ... nor with one made with another key, or for another method
        method = "/hsu.echo.v1.Echo/Echo"
        wrong = [
            (peer.PeerSigner("another-key-0123456789"), method),
            (peer.PeerSigner(KEY), "/hsu.echo.v1.Echo/EchoStream"),
        ]
        for signer, for_method in wrong:
            with pytest.raises(grpc.RpcError) as info:
                echo_pb2_grpc.EchoStub(ch).Echo(
                    echo_pb2.EchoRequest(message="x"),
                    timeout=10,
                    metadata=(signer.header(ep.address, for_method),),
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # with it, it does; and health stays open to probes and load balancers
        reply = echo_pb2_grpc.EchoStub(ch).Echo(
            echo_pb2.EchoRequest(message="signed"),
            timeout=10,
            metadata=(peer.PeerSigner(KEY).header(ep.address, method),),
        )
        assert reply.instance_id == c_instance
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("cluster_hosts", [("at-start",) * 3], indirect=True)
def test_idempotent_calls_from_a_do_not_fail_while_host_b_is_lost(
    cluster_hosts: list[Kernel],
) -> None:
    a, b, _ = cluster_hosts
    until(lambda: len(resolve(a)) == 3, "3 instances in a's registry")
    everyone = resolve(a)
    [b_hsu] = psutil.Process(b.proc.pid).children()
    b_instance = b_hsu.environ()["HSU_INSTANCE_ID"]
    with grpc.insecure_channel(data(a)) as ch:
        # a's gateway balances over every host's instance, b's too
        seen = {echo(ch).instance_id for _ in range(30)}
        assert seen == everyone
        # SIGKILL b's kernel and its HSU: nothing revokes b's lease or its entry
        os.kill(b.proc.pid, signal.SIGKILL)
        os.kill(b_hsu.pid, signal.SIGKILL)
        b.proc.wait(10)
        calls, failed, after = 0, [], set()

        def b_gone() -> bool:
            nonlocal calls
            for _ in range(10):
                calls += 1
                try:
                    after.add(echo(ch).instance_id)
                except grpc.RpcError as exc:
                    failed.append(f"{exc.code()}: {exc.details()}")
            return b_instance not in resolve(a)

        until(b_gone, "b's instance gone from a's registry (its lease expired)")
    assert not failed, f"{len(failed)} of {calls} calls failed: {failed[:3]}"
    assert after == everyone - {b_instance}
    assert calls >= 10


@pytest.mark.parametrize(
    ("kernel", "why"),
    [
        ({"advertise": "10.20.30.40"}, "10.20.30.40 is off loopback"),
        ({"advertise": "0.0.0.0", "cluster_key": KEY}, "is not an address other hosts can reach"),
        ({"advertise": "10.20.30.40:7000", "cluster_key": KEY}, "is not a host"),
        ({"advertise": "10.20.30.40", "cluster_key": "short"}, "at least 16 characters"),
    ],
)
def test_an_advertised_address_off_loopback_needs_the_cluster_key(
    kernel: dict[str, Any], why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_kernel(
            {"kernel": {"registry": "etcd", **kernel}, "etcd": {"endpoints": ["127.0.0.1:2379"]}},
            plugins=[hsu_plugin_etcd],
        )
    assert "kernel." in str(info.value) and why in str(info.value)
    assert KEY not in str(info.value)


async def test_advertise_on_loopback_needs_no_key_and_instances_listen_there(
    hsu_kernel_factory: Any,
) -> None:
    k = await hsu_kernel_factory(
        {
            "name": "adv",
            "kernel": {"advertise": "127.0.0.2"},
            "units": {"echo": echo_unit("at-start")},
        }
    )
    [inst] = [i for i in k.instances.values() if i.state.value == "ready"]
    assert inst.address.startswith("127.0.0.2:")


async def test_with_a_cluster_key_an_hsu_that_takes_unsigned_calls_is_not_made_ready(
    hsu_kernel_factory: Any,
) -> None:
    unsigned = echo_unit("on-demand")
    # the same HSU, but its server never hears of the key: it takes any call
    unsigned["command"] = ["env", "-u", peer.ENV_KEY, sys.executable, "-m", "hsu_echo"]
    k = await hsu_kernel_factory(
        {
            "name": "guard",
            "kernel": {"advertise": "127.0.0.2", "cluster_key": KEY},
            "units": {"echo": echo_unit("at-start"), "open": {**unsigned, "interfaces": []}},
        }
    )
    # the SDK's HSU checks the proof: it is ready, and the kernel's own calls are signed
    [inst] = [i for i in k.instances.values() if i.state.value == "ready"]
    async with k.connect() as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="in"))
    assert reply.instance_id == inst.instance_id
    # one that does not check is stopped before it is ready, saying why
    with pytest.raises(HsuError) as info:
        await k.start_instance("open")
    assert "without the cluster's proof" in str(info.value)
