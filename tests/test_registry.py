"""The memory registry: etcd's semantics (revisions, leases, list-then-watch)."""

import asyncio
import gc

import pytest

import hsu
import hsu_plugins.routing.registry_memory as registry_memory
from hsu.ports import DRAINING, Endpoint, Registry, RegistryCompacted, RegistryEvent
from hsu_plugins.routing.registry_memory import MemoryRegistry

ECHO = "hsu.echo.v1.Echo"
OTHER = "pkg.Other"
#: the longest any test waits for something that should happen at once
WAIT = 2.0


def ep(instance_id: str, *interfaces: str, **kw: object) -> Endpoint:
    return Endpoint(
        instance_id=instance_id,
        unit=instance_id.split("-")[0],
        address=f"unix:/tmp/{instance_id}.sock",
        interfaces=interfaces or (ECHO,),
        **kw,
    )


async def take(watch, n: int) -> list[RegistryEvent]:
    """The next ``n`` events, or fail after WAIT seconds."""
    got: list[RegistryEvent] = []
    async with asyncio.timeout(WAIT):
        async for event in watch:
            got.append(event)
            if len(got) == n:
                break
    return got


def brief(events: list[RegistryEvent]) -> list[tuple[str, str, int]]:
    return [(e.kind, e.endpoint.instance_id, e.revision) for e in events]


@pytest.fixture
async def reg():
    registry = MemoryRegistry()
    yield registry
    await registry.close()


def test_it_is_a_registry_and_can_be_built_outside_a_loop():
    assert isinstance(MemoryRegistry(), Registry)
    assert isinstance(registry_memory.create(object()), MemoryRegistry)


async def test_the_plugin_manager_hands_out_the_memory_registry(hsu_plugin_manager):
    pm = hsu_plugin_manager
    if "memory" not in pm.registry_names():  # not yet a default plugin
        pm.register(registry_memory, "registry_memory")
    assert "memory" in pm.registry_names()
    registry = pm.registry("memory")(object())
    try:
        assert isinstance(registry, Registry)
        await registry.put(ep("a-1"))
        assert await registry.lookup(ECHO) == [ep("a-1")]
    finally:
        await registry.close()


async def test_put_lookup_delete_and_revisions(reg):
    assert await reg.snapshot() == ([], 0)
    await reg.put(ep("b-1"))
    await reg.put(ep("a-1"))
    assert reg.revision == 2
    assert await reg.lookup(ECHO) == [ep("a-1"), ep("b-1")]  # by instance_id
    assert await reg.lookup(OTHER) == []

    changed = ep("a-1", state=DRAINING)
    await reg.put(changed)
    assert reg.revision == 3
    assert await reg.lookup(ECHO) == [changed, ep("b-1")]

    assert await reg.delete("a-1") is True
    assert await reg.delete("a-1") is False
    assert reg.revision == 4
    assert await reg.lookup(ECHO) == [ep("b-1")]
    assert await reg.snapshot() == ([ep("b-1")], 4)


async def test_the_index_follows_interfaces_as_they_change(reg):
    await reg.put(ep("a-1", ECHO, OTHER))
    await reg.put(ep("b-1", OTHER))
    assert [e.instance_id for e in await reg.lookup(ECHO)] == ["a-1"]
    assert [e.instance_id for e in await reg.lookup(OTHER)] == ["a-1", "b-1"]

    await reg.put(ep("a-1", ECHO))  # stops serving OTHER
    assert [e.instance_id for e in await reg.lookup(OTHER)] == ["b-1"]
    await reg.delete("b-1")
    assert await reg.lookup(OTHER) == []
    assert reg.lookup_now(OTHER) == ()
    assert reg._by_interface.keys() == {ECHO}  # nothing left behind


async def test_lookup_now_is_cached_until_the_interface_changes(reg):
    await reg.put(ep("a-1"))
    await reg.put(ep("x-1", OTHER))
    first = reg.lookup_now(ECHO)
    assert first == (ep("a-1"),)
    assert reg.lookup_now(ECHO) is first
    await reg.put(ep("x-2", OTHER))  # another interface: the cache stays
    assert reg.lookup_now(ECHO) is first
    await reg.put(ep("b-1"))
    assert reg.lookup_now(ECHO) == (ep("a-1"), ep("b-1"))


async def test_lookup_among_a_thousand_endpoints_returns_the_right_subset(reg):
    interfaces = [f"svc.S{i}" for i in range(10)]
    for n in range(1000):
        await reg.put(ep(f"u-{n:04d}", interfaces[n % 10], *(["svc.All"] if n % 2 else [])))
    assert reg.revision == 1000
    for i, interface in enumerate(interfaces):
        found = await reg.lookup(interface)
        assert [e.instance_id for e in found] == [f"u-{n:04d}" for n in range(i, 1000, 10)]
    everything = reg.lookup_now("svc.All")
    assert len(everything) == 500
    assert all(int(e.instance_id[2:]) % 2 for e in everything)
    for n in range(0, 1000, 10):
        await reg.delete(f"u-{n:04d}")
    assert await reg.lookup("svc.S0") == []
    assert len(await reg.lookup("svc.S1")) == 100


async def test_a_put_that_changes_nothing_makes_no_event(reg):
    await reg.put(ep("a-1"), ttl=5)
    await reg.put(ep("a-1"), ttl=5)
    await reg.put(ep("a-1"), ttl=7)  # still leased: only the lease moves
    assert reg.revision == 1
    await reg.put(ep("a-1"))  # the lease goes: a change
    assert reg.revision == 2
    await reg.put(ep("a-1"))
    assert reg.revision == 2
    await reg.put(ep("a-1", weight=3))
    assert reg.revision == 3


async def test_a_lease_expires_with_a_delete_event(reg):
    _, revision = await reg.snapshot()
    watch = reg.watch(revision)
    await reg.put(ep("a-1"), ttl=0.05)
    await reg.put(ep("b-1"))
    events = await take(watch, 3)
    assert brief(events) == [("put", "a-1", 1), ("put", "b-1", 2), ("delete", "a-1", 3)]
    assert await reg.lookup(ECHO) == [ep("b-1")]
    assert reg.revision == 3
    assert reg._timer is None  # nothing left to expire: no timer


async def test_keepalive_and_put_extend_a_lease(reg):
    await reg.put(ep("a-1"), ttl=0.3)
    await reg.put(ep("b-1"), ttl=0.3)
    for _ in range(6):  # 0.36 s in all: past the first deadline
        await asyncio.sleep(0.06)
        assert await reg.keepalive("a-1") is True
        await reg.put(ep("b-1"), ttl=0.3)
    assert [e.instance_id for e in await reg.lookup(ECHO)] == ["a-1", "b-1"]
    assert reg.revision == 2  # keepalives make no events

    events = await take(reg.watch(2), 2)  # left alone, both expire
    assert sorted((e.kind, e.endpoint.instance_id) for e in events) == [
        ("delete", "a-1"),
        ("delete", "b-1"),
    ]
    assert await reg.lookup(ECHO) == []
    assert await reg.keepalive("a-1") is False


async def test_keepalive_on_unknown_or_unleased(reg):
    assert await reg.keepalive("nobody") is False
    await reg.put(ep("a-1"))
    assert await reg.keepalive("a-1") is True


async def test_a_put_without_ttl_removes_the_lease(reg):
    await reg.put(ep("a-1"), ttl=0.05)
    await reg.put(ep("a-1"))
    await asyncio.sleep(0.15)
    assert await reg.lookup(ECHO) == [ep("a-1")]


async def test_a_delete_cancels_the_lease(reg):
    await reg.put(ep("a-1"), ttl=0.05)
    await reg.delete("a-1")
    await reg.put(ep("a-1"))  # back, without a lease
    await asyncio.sleep(0.15)
    assert await reg.lookup(ECHO) == [ep("a-1")]
    assert reg.revision == 3


async def test_leases_expire_in_deadline_order_from_one_timer(reg):
    _, revision = await reg.snapshot()
    watch = reg.watch(revision)
    await reg.put(ep("slow-1"), ttl=0.2)
    await reg.put(ep("fast-1"), ttl=0.05)
    await reg.put(ep("mid-1"), ttl=0.1)
    events = await take(watch, 6)
    assert [(e.kind, e.endpoint.instance_id) for e in events[3:]] == [
        ("delete", "fast-1"),
        ("delete", "mid-1"),
        ("delete", "slow-1"),
    ]
    assert [e.revision for e in events] == [1, 2, 3, 4, 5, 6]


async def test_many_keepalives_do_not_grow_the_deadline_heap(reg):
    await reg.put(ep("a-1"), ttl=60)
    for _ in range(1000):
        await reg.keepalive("a-1")
    assert len(reg._deadlines) < 100


async def test_bad_ttl_is_refused(reg):
    with pytest.raises(ValueError, match="ttl"):
        await reg.put(ep("a-1"), ttl=0)


async def test_watch_from_the_snapshot_sees_changes_in_order(reg):
    await reg.put(ep("a-1"))
    endpoints, revision = await reg.snapshot()
    assert (endpoints, revision) == ([ep("a-1")], 1)
    watch = reg.watch(revision)
    await reg.put(ep("b-1"))
    await reg.put(ep("a-1", state=DRAINING))
    await reg.delete("a-1")
    events = await take(watch, 3)
    assert brief(events) == [("put", "b-1", 2), ("put", "a-1", 3), ("delete", "a-1", 4)]
    assert events[1].endpoint.state == DRAINING


async def test_watch_waits_for_changes_made_later(reg):
    watch = reg.watch(0)

    async def later() -> None:
        await asyncio.sleep(0.02)
        await reg.put(ep("a-1"))

    task = asyncio.create_task(later())
    assert brief(await take(watch, 1)) == [("put", "a-1", 1)]
    await task


async def test_watch_from_a_revision_to_come_skips_the_changes_before_it(reg):
    watch = reg.watch(2)
    for name in "abc":
        await reg.put(ep(f"{name}-1"))
    assert brief(await take(watch, 1)) == [("put", "c-1", 3)]


async def test_watch_from_an_older_revision_replays(reg):
    for name in "abcde":
        await reg.put(ep(f"{name}-1"))
    watch = reg.watch(2)
    await reg.delete("a-1")
    events = await take(watch, 4)
    assert brief(events) == [
        ("put", "c-1", 3),
        ("put", "d-1", 4),
        ("put", "e-1", 5),
        ("delete", "a-1", 6),
    ]


async def test_watch_from_a_compacted_revision_raises():
    reg = MemoryRegistry(history=3)
    for name in "abcde":
        await reg.put(ep(f"{name}-1"))
    # revisions 3, 4 and 5 are kept: from 2 on is fine, from 1 is not
    assert brief(await take(reg.watch(2), 3)) == [
        ("put", "c-1", 3),
        ("put", "d-1", 4),
        ("put", "e-1", 5),
    ]
    with pytest.raises(RegistryCompacted, match="revision 1 is compacted"):
        await take(reg.watch(1), 1)
    assert reg.watching == 0  # the refused watch never subscribed
    await reg.close()


async def test_a_slow_watcher_is_dropped_and_does_not_block_puts():
    reg = MemoryRegistry(watch_queue=5)
    slow = reg.watch(0)
    fast = reg.watch(0)
    assert reg.watching == 2
    fast_got: list[RegistryEvent] = []

    async def keep_up() -> None:
        async for event in fast:
            fast_got.append(event)

    task = asyncio.create_task(keep_up())
    async with asyncio.timeout(WAIT):
        for n in range(20):
            await reg.put(ep(f"a-{n}"))
            await asyncio.sleep(0)  # the fast watcher keeps up
    assert reg.revision == 20
    assert reg.watching == 1  # the slow one is gone
    with pytest.raises(RegistryCompacted, match="more than 5 events behind"):
        await take(slow, 1)
    await reg.close()
    await asyncio.wait_for(task, WAIT)
    assert [e.revision for e in fast_got] == list(range(1, 21))


async def test_close_ends_watchers_cleanly_and_is_idempotent():
    reg = MemoryRegistry()
    await reg.put(ep("a-1"), ttl=30)
    watch = reg.watch(1)
    got: list[RegistryEvent] = []

    async def follow() -> None:
        async for event in watch:
            got.append(event)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    await reg.put(ep("b-1"))
    await reg.close()
    await reg.close()
    await asyncio.wait_for(task, WAIT)  # the loop ended: no exception
    assert brief(got) == [("put", "b-1", 2)]
    assert reg._timer is None
    assert reg.watching == 0
    with pytest.raises(RuntimeError, match="closed"):
        await reg.put(ep("c-1"))
    assert await reg.lookup(ECHO) == [ep("a-1"), ep("b-1")]  # still readable
    assert await take(reg.watch(0), 1) == []  # a watch on a closed registry ends at once


async def test_breaking_out_or_aclose_unsubscribes(reg):
    await reg.put(ep("a-1"))
    await reg.put(ep("b-1"))
    assert len(await take(reg.watch(0), 1)) == 1  # broke out; the iterator is dropped
    gc.collect()
    assert reg.watching == 0

    watch = reg.watch(0)
    assert reg.watching == 1
    await watch.aclose()
    assert reg.watching == 0
    with pytest.raises(StopAsyncIteration):
        await anext(watch)


async def test_cancelling_the_watching_task_unsubscribes(reg):
    watch = reg.watch(0)

    async def follow() -> None:
        async for _ in watch:
            pass

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    assert reg.watching == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reg.watching == 0
    await reg.put(ep("a-1"))  # nobody to deliver to


async def test_the_lease_timer_is_armed_only_for_the_earliest_deadline(reg):
    await reg.put(ep("a-1"), ttl=30)
    timer = reg._timer
    assert timer is not None
    await reg.put(ep("b-1"), ttl=60)  # later: the same timer
    assert reg._timer is timer
    await reg.put(ep("c-1"), ttl=0.05)  # earlier: re-armed
    assert reg._timer is not timer
    assert brief(await take(reg.watch(3), 1)) == [("delete", "c-1", 4)]
    assert reg.lookup_now(ECHO) == (ep("a-1"), ep("b-1"))
    assert reg._timer is not None
    assert reg._timer_at == reg._leases["a-1"][1]


def test_another_plugin_adds_a_registry_but_cannot_take_memory():
    from hsu._kernel.plugins import PluginManager
    from hsu.errors import ConflictError

    pm = PluginManager.load(env={}, autoload=False)
    made = []

    class Mine:
        @hsu.hookimpl
        def hsu_register_registries(self, register):
            register("mine", lambda kernel: made.append(kernel) or MemoryRegistry())

    class Clash:
        @hsu.hookimpl
        def hsu_register_registries(self, register):
            register("memory", lambda kernel: MemoryRegistry())

    pm.register(Mine(), "mine")
    assert isinstance(pm.registry("mine")("k"), MemoryRegistry)
    assert made == ["k"]
    with pytest.raises(
        ConflictError, match="registry 'memory' is registered by plugin 'registry_memory'"
    ):
        pm.register(Clash(), "clash")
    assert pm.registry("memory") is registry_memory.create
