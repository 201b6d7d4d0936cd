"""The ``etcd`` registry against a real 3-member etcd cluster: entries shared
across registries (kernels), one lease per kernel, the local copy through a
member's stop, a compaction under the watch and a lost lease."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
from hsu_plugin_etcd.cluster import LocalCluster
from hsu_plugin_etcd.registry import EtcdRegistry
from hsu_plugin_etcd.settings import EtcdSettings

from hsu.ports import Endpoint, RegistryEvent

ECHO = "hsu.echo.v1.Echo"
OTHER = "hsu.other.v1.Other"


def ep(n: int, interfaces: tuple[str, ...] = (ECHO,), state: str = "serving") -> Endpoint:
    return Endpoint(f"echo-{n}", "echo", f"127.0.0.1:{5000 + n}", interfaces, state)


def registry(cluster: LocalCluster, node: str, ttl: int = 10) -> EtcdRegistry:
    return EtcdRegistry(EtcdSettings(endpoints=tuple(cluster.endpoints), ttl=ttl), node)


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll (bounded) until ``check()``; fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def ids(reg: EtcdRegistry, interface: str = ECHO) -> set[str]:
    return {e.instance_id for e in await reg.lookup(interface)}


@pytest.fixture
async def registries(etcd_cluster: LocalCluster) -> AsyncIterator[list[EtcdRegistry]]:
    regs = [registry(etcd_cluster, f"node{i}") for i in range(3)]
    try:
        yield regs
    finally:
        for r in regs:
            await r.close()


async def test_an_entry_put_on_one_kernel_is_seen_by_every_kernel(
    etcd_cluster: LocalCluster, registries: list[EtcdRegistry]
) -> None:
    a, b, c = registries
    await a.put(ep(1, (ECHO, OTHER)))
    await c.put(ep(2))
    for r in registries:
        await r.snapshot()
    state: dict[int, set[str]] = {}

    async def refresh() -> None:
        for i, r in enumerate(registries):
            state[i] = await ids(r)

    for _ in range(500):
        await refresh()
        if all(s == {"echo-1", "echo-2"} for s in state.values()):
            break
        await asyncio.sleep(0.02)
    assert all(s == {"echo-1", "echo-2"} for s in state.values()), state
    assert await ids(b, OTHER) == {"echo-1"}
    # the keys: one per interface, under the writer's node, on its lease
    out = etcd_cluster.etcdctl("get", "--prefix", "/hsu/v1/svc/", "--keys-only")
    keys = {k for k in out.split("\n") if k}
    assert keys == {
        f"/hsu/v1/svc/{ECHO}/node0/echo-1",
        f"/hsu/v1/svc/{OTHER}/node0/echo-1",
        f"/hsu/v1/svc/{ECHO}/node2/echo-2",
    }
    info = json.loads(etcd_cluster.etcdctl("get", f"/hsu/v1/svc/{ECHO}/node0/echo-1", "-w", "json"))
    assert info["kvs"][0]["lease"] == a.lease
    # a change and a delete travel too; one interface dropped removes one key
    await a.put(ep(1, (OTHER,)))
    await until(
        lambda: (
            "echo-1" not in {e.instance_id for e in b._endpoints.values() if ECHO in e.interfaces}
        ),
        "echo-1 left ECHO on b",
    )
    assert await ids(b, OTHER) == {"echo-1"}
    assert await c.delete("echo-2")
    await until(lambda: "echo-2" not in a._endpoints, "echo-2 deleted on a")


async def test_a_closed_kernel_takes_its_entries_and_a_watch_sees_them_go(
    registries: list[EtcdRegistry],
) -> None:
    a, b, _ = registries
    await a.put(ep(1))
    await until(lambda: "echo-1" in b._endpoints, "echo-1 on b")
    _, rev = await b.snapshot()
    seen: list[RegistryEvent] = []

    async def follow() -> None:
        async for event in b.watch(rev):
            seen.append(event)

    task = asyncio.ensure_future(follow())
    try:
        await a.close()  # revokes its lease: every key of a's goes at once
        await until(lambda: any(e.kind == "delete" for e in seen), "the delete event on b")
        assert [(e.kind, e.endpoint.instance_id) for e in seen] == [("delete", "echo-1")]
        assert seen[0].revision > rev
        assert await ids(b) == set()
    finally:
        task.cancel()


async def test_stopping_one_member_keeps_everything_working(
    etcd_cluster: LocalCluster, registries: list[EtcdRegistry]
) -> None:
    a, b, c = registries
    await a.put(ep(1))
    await until(lambda: "echo-1" in c._endpoints, "echo-1 on c")
    for member in etcd_cluster.members[:1]:
        etcd_cluster.stop_member(member)
    # writes, watches and leases go on through the two members left
    await b.put(ep(2))
    await c.put(ep(3))
    for r in registries:
        await until(
            lambda r=r: set(r._endpoints) == {"echo-1", "echo-2", "echo-3"},
            f"every entry on {r.node}",
        )
    assert await b.delete("echo-2")
    await until(lambda: "echo-2" not in a._endpoints, "echo-2 deleted on a")
    # leases stayed alive through the stop: nobody had to grant a new one
    await asyncio.sleep(0.5)
    assert [r.leases_granted for r in registries] == [1, 1, 1]
    assert set(a._endpoints) == {"echo-1", "echo-3"}


async def test_a_compaction_under_the_watch_lists_again_without_losing_a_change(
    etcd_cluster: LocalCluster, registries: list[EtcdRegistry]
) -> None:
    a, b, _ = registries
    await a.put(ep(1))
    await until(lambda: "echo-1" in b._endpoints, "echo-1 on b")
    # hold b's watch back, change etcd behind it, compact past where it stands
    stalled = b._tasks[1]
    stalled.cancel()
    await asyncio.gather(stalled, return_exceptions=True)
    stood = b.revision
    await a.put(ep(2))
    assert await a.delete("echo-1")
    await a.put(ep(3, state="draining"))
    head = a.revision
    await until(lambda: a.revision >= head and "echo-3" in a._endpoints, "a follows")
    etcd_cluster.etcdctl("compact", str(a.revision))
    _, before = await b.snapshot()
    events: list[RegistryEvent] = []

    async def follow() -> None:
        async for event in b.watch(before):
            events.append(event)

    watcher = asyncio.ensure_future(follow())
    try:
        b._tasks[1] = asyncio.ensure_future(b._sync(stood))
        await until(lambda: set(b._endpoints) == {"echo-2", "echo-3"}, "b re-listed")
        assert b.relists == 1
        assert b._endpoints["echo-3"].state == "draining"
        # the watcher is a task of its own: it takes the re-list's events after b has them
        await until(lambda: len(events) >= 3, "b's watcher told of the re-list")
        assert sorted((e.kind, e.endpoint.instance_id) for e in events) == [
            ("delete", "echo-1"),
            ("put", "echo-2"),
            ("put", "echo-3"),
        ]
        # and it watches on from the listing: a later change arrives
        await a.put(ep(4))
        await until(lambda: "echo-4" in b._endpoints, "echo-4 on b after the re-list")
    finally:
        watcher.cancel()


async def test_a_lost_lease_is_replaced_and_the_entries_put_again_once(
    etcd_cluster: LocalCluster, registries: list[EtcdRegistry]
) -> None:
    a, b, _ = registries
    await a.put(ep(1, (ECHO, OTHER)))
    await until(lambda: "echo-1" in b._endpoints, "echo-1 on b")
    old = a.lease
    # the lease is gone (as after an outage longer than its TTL)
    etcd_cluster.etcdctl("lease", "revoke", f"{old:x}")
    await until(lambda: a.leases_granted == 2 and a.lease != old, "a granted a new lease")
    await until(lambda: "echo-1" in b._endpoints, "echo-1 back on b")
    out = etcd_cluster.etcdctl("get", "--prefix", "/hsu/v1/svc/", "-w", "json")
    kvs = json.loads(out)["kvs"]
    assert len(kvs) == 2  # no duplicates: the same two keys
    assert {kv["lease"] for kv in kvs} == {a.lease}
    assert await ids(b) == {"echo-1"}
