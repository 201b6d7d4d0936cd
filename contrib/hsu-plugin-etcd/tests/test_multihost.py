"""Three kernels on three hosts: network namespaces joined by a bridge (veth
pairs), the etcd cluster on the bridge. A partitioned leader stops its
singleton before another host's starts (never two at once, looked at every
50 ms), and when its link returns it rejoins as a follower with its registry
entries listed once. Every namespace, link and process is removed afterwards,
also when the test fails. With HSU_REQUIRE_NETNS set, a machine that cannot
make namespaces fails the test instead of skipping it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hsu_plugin_etcd import netns
from hsu_plugin_etcd.cluster import LocalCluster

from .test_leadership import Kernel, Watch, single_unit, singletons, until

ECHO = {"command": ["python", "-m", "hsu_echo"], "interfaces": ["hsu.echo.v1.Echo"]}


def svc_keys(cluster: LocalCluster) -> list[dict[str, object]]:
    out = json.loads(cluster.etcdctl("get", "--prefix", "/hsu/v1/svc/", "-w", "json"))
    import base64

    return [
        {"key": base64.b64decode(kv["key"]).decode(), "lease": kv.get("lease", 0)}
        for kv in out.get("kvs", [])
    ]


def test_a_partitioned_leader_stops_first_and_rejoins_without_duplicates(
    hosts: netns.Hosts, bridge_etcd: LocalCluster, tmp_path: Path
) -> None:
    units = {"single": single_unit(), "plain": {**ECHO, "start": "at-start"}}
    kernels = [
        Kernel(n, bridge_etcd, tmp_path, units=units, wrap=lambda a, i=i: hosts.argv(i, a))
        for i, n in enumerate(("a", "b", "c"))
    ]
    watch = Watch()
    try:
        for k in kernels:
            k.wait_ready()
        [(old_pid, leader_pid, _, token)] = until(
            lambda: [s for s in singletons() if s[3]], "one host runs the singleton"
        )
        leader = next(i for i, k in enumerate(kernels) if k.proc.pid == leader_pid)
        until(lambda: len(svc_keys(bridge_etcd)) == 4, "3 plain + 1 single listed")
        hosts.cut(leader)
        # the partitioned leader stops its instance; only then may another start
        order: list[str] = []

        def progress() -> bool:
            now = singletons()
            if not any(s[0] == old_pid for s in now) and "stopped" not in order:
                order.append("stopped")
            if any(s[0] != old_pid for s in now) and "elected" not in order:
                order.append("elected")
            return len(order) == 2

        until(progress, "the old leader stopped and another host runs the singleton")
        assert order == ["stopped", "elected"]
        [(_, new_kernel, _, new_token)] = singletons()
        assert new_kernel != leader_pid and int(new_token) > int(token)
        hosts.mend(leader)

        # the old leader rejoins: its plain instance is listed once, on a live lease
        def rejoined() -> bool:
            keys = svc_keys(bridge_etcd)
            names = [k["key"] for k in keys]
            mine = [n for n in names if f"/{kernels[leader].name}/" in str(n)]
            return len(keys) == 4 and len(set(names)) == 4 and len(mine) == 1

        until(rejoined, "the old leader's entries back, once each", timeout=60)
        leases = {k["lease"] for k in svc_keys(bridge_etcd)}
        assert 0 not in leases and len(leases) == 3  # one lease per kernel
        # and it stays a follower: still one singleton, the new leader's
        assert [s[1] for s in singletons()] == [new_kernel]
    finally:
        watch.stop()
        for k in kernels:
            k.stop()
    assert watch.most == 1, f"two at once: {watch.seen}"


def resolve(kernel: Kernel) -> set[str]:
    """The instances of the plain unit's interface in ``kernel``'s registry, as
    it answers Kernel.Resolve."""
    import grpc

    from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    with grpc.insecure_channel(kernel.control) as channel:
        reply = kernel_pb2_grpc.KernelStub(channel).Resolve(
            kernel_pb2.ResolveRequest(interface="hsu.echo.v1.Echo"), timeout=5
        )
    return {e.instance_id for e in reply.endpoints}


def test_a_killed_hosts_entries_leave_every_other_hosts_registry(
    hosts: netns.Hosts, bridge_etcd: LocalCluster, tmp_path: Path
) -> None:
    import signal

    import psutil

    units = {"plain": {**ECHO, "start": "at-start"}}
    kernels = [
        Kernel(n, bridge_etcd, tmp_path, units=units, wrap=lambda a, i=i: hosts.argv(i, a))
        for i, n in enumerate(("a", "b", "c"))
    ]
    try:
        for k in kernels:
            k.wait_ready()
        until(lambda: len(resolve(kernels[0])) == 3, "3 instances in a's registry")
        everyone = resolve(kernels[0])
        assert all(resolve(k) == everyone for k in kernels)
        b = kernels[1]
        [b_hsu] = psutil.Process(b.proc.pid).children()
        b_instance = b_hsu.environ()["HSU_INSTANCE_ID"]
        assert b_instance in everyone
        # SIGKILL b's kernel and its HSU: nothing revokes b's lease; it expires
        os.kill(b.proc.pid, signal.SIGKILL)
        os.kill(b_hsu.pid, signal.SIGKILL)
        b.proc.wait(10)
        for k in (kernels[0], kernels[2]):
            until(
                lambda k=k: resolve(k) == everyone - {b_instance},
                f"b's instance gone from {k.name}'s registry",
            )
        assert not any(f"/b/{b_instance}" in str(x["key"]) for x in svc_keys(bridge_etcd))
    finally:
        for k in kernels:
            k.stop()
