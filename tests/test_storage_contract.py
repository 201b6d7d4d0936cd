"""The contract every storage (hsu.ports.Storage) keeps: the same tests,
parametrized over each storage this repository ships (sqlite built in; redis
from contrib/hsu-plugin-redis, against a real redis-server each test starts
on a loopback port and stops by pid; etcd from contrib/hsu-plugin-etcd, on a
one-member etcd cluster each test starts the same way). A third party's storage can run them
too: ``storages`` below is the table to extend.

The second half runs a kernel on each storage: every acknowledged put
survives a SIGKILL (of the kernel, and of redis-server with appendfsync
always), a unit cannot reach another unit's namespace through the service,
and a redis-server killed mid-run fails storage calls UNAVAILABLE naming its
address while the kernel stays SERVING (and so does an etcd cluster that
stops)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hsu_plugin_etcd.cluster import LocalCluster, etcd_executable
from hsu_plugin_etcd.settings import EtcdSettings
from hsu_plugin_etcd.storage import EtcdStorage
from hsu_plugin_redis.server import LocalRedis, redis_executable
from hsu_plugin_redis.settings import RedisSettings
from hsu_plugin_redis.storage import RedisStorage

from conftest import write_deployment
from hsu.errors import InvalidValue
from hsu.ports import Storage, StorageEvent
from hsu.storage import StorageClient
from hsu.storage.v1 import storage_pb2, storage_pb2_grpc
from hsu_plugins.storage.sqlite import SqliteStorage

MAX_VALUE = 4096


def _sqlite(tmp_path: Path) -> contextlib.AbstractAsyncContextManager[Storage]:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Storage]:
        s = SqliteStorage(tmp_path / "contract.sqlite3", max_value_bytes=MAX_VALUE)
        try:
            yield s
        finally:
            await s.close()

    return make()


def need_redis() -> None:
    """Skip without redis-server, or fail when HSU_REQUIRE_REDIS is 1."""
    if redis_executable() is None:
        if os.environ.get("HSU_REQUIRE_REDIS") == "1":
            pytest.fail("HSU_REQUIRE_REDIS=1 but there is no redis-server (Debian: redis-server)")
        pytest.skip("redis-server is not installed (Debian: redis-server)")


def need_etcd() -> None:
    """Skip without etcd, or fail when HSU_REQUIRE_ETCD is 1."""
    if etcd_executable() is None:
        if os.environ.get("HSU_REQUIRE_ETCD") == "1":
            pytest.fail("HSU_REQUIRE_ETCD=1 but there is no etcd (Debian: etcd-server)")
        pytest.skip("etcd is not installed (Debian: etcd-server)")


def _redis(tmp_path: Path) -> contextlib.AbstractAsyncContextManager[Storage]:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Storage]:
        need_redis()
        server = LocalRedis(tmp_path / "redis")
        server.start()
        s = RedisStorage(RedisSettings(address=server.address), max_value_bytes=MAX_VALUE)
        try:
            yield s
        finally:
            await s.close()
            server.stop()

    return make()


def _etcd(tmp_path: Path) -> contextlib.AbstractAsyncContextManager[Storage]:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Storage]:
        need_etcd()
        # one member for speed; the 3-member cluster is contrib/hsu-plugin-etcd's tests
        cluster = LocalCluster(tmp_path / "etcd", 1)
        try:
            await asyncio.to_thread(cluster.start)
            s = EtcdStorage(
                EtcdSettings(endpoints=tuple(cluster.endpoints), prefix="/contract"),
                max_value_bytes=MAX_VALUE,
            )
            try:
                yield s
            finally:
                await s.close()
        finally:
            cluster.stop()

    return make()


storages: dict[str, Callable[[Path], contextlib.AbstractAsyncContextManager[Storage]]] = {
    "sqlite": _sqlite,
    "redis": _redis,
    "etcd": _etcd,
}


@pytest.fixture(params=sorted(storages))
async def store(request: Any, tmp_path: Path) -> AsyncIterator[Storage]:
    async with storages[request.param](tmp_path) as s:
        yield s


async def test_put_then_get_with_revisions_and_versions(store):
    assert await store.get("a", "k") is None
    first = await store.put("a", "k", b"one")
    assert (first.key, first.value, first.version) == ("k", b"one", 1)
    assert first.create_revision == first.mod_revision > 0
    second = await store.put("a", "k", b"two")
    assert second.mod_revision > first.mod_revision
    assert second.create_revision == first.create_revision
    assert second.version == 2
    got = await store.get("a", "k")
    assert got is not None
    assert (got.value, got.mod_revision, got.version) == (b"two", second.mod_revision, 2)


async def test_delete_and_recreate(store):
    assert await store.delete("a", "gone") == 0
    kv = await store.put("a", "k", b"v")
    rev = await store.delete("a", "k")
    assert rev > kv.mod_revision
    assert await store.get("a", "k") is None
    again = await store.put("a", "k", b"w")
    assert again.version == 1 and again.create_revision > rev


async def test_namespaces_are_apart(store):
    await store.put("a", "k", b"in a")
    await store.put("b", "k", b"in b")
    a, b = await store.get("a", "k"), await store.get("b", "k")
    assert a is not None and b is not None and (a.value, b.value) == (b"in a", b"in b")
    await store.delete("a", "k")
    assert await store.get("b", "k") is not None
    items, _ = await store.list("b")
    assert [kv.key for kv in items] == ["k"]


async def test_list_by_prefix_in_key_order(store):
    for key in ["x/2", "x/1", "x0", "y", "x/3", "x", "x/\u00e9"]:
        await store.put("ns", key, key.encode())
    await store.put("other", "x/9", b"")
    items, rev = await store.list("ns", "x/")
    assert [kv.key for kv in items] == ["x/1", "x/2", "x/3", "x/\u00e9"]
    assert rev >= max(kv.mod_revision for kv in items)
    items, _ = await store.list("ns", "x/", limit=2)
    assert [kv.key for kv in items] == ["x/1", "x/2"]
    everything, _ = await store.list("ns")
    assert len(everything) == 7


async def test_compare_and_set(store):
    ok, kv = await store.compare_and_set("ns", "lock", b"mine", 0)
    assert ok and kv is not None and kv.value == b"mine"
    # revision 0: only when absent
    ok, now = await store.compare_and_set("ns", "lock", b"theirs", 0)
    assert not ok and now is not None and now.value == b"mine"
    # a stale revision is refused and shows the current one
    await store.put("ns", "lock", b"moved")
    ok, now = await store.compare_and_set("ns", "lock", b"late", kv.mod_revision)
    assert not ok and now is not None and now.value == b"moved"
    ok, done = await store.compare_and_set("ns", "lock", b"next", now.mod_revision)
    assert ok and done is not None and done.value == b"next" and done.version == now.version + 1
    # None deletes, on the revision too
    ok, _ = await store.compare_and_set("ns", "lock", None, now.mod_revision)
    assert not ok
    ok, gone = await store.compare_and_set("ns", "lock", None, done.mod_revision)
    assert ok and gone is None and await store.get("ns", "lock") is None
    ok, _ = await store.compare_and_set("ns", "lock", None, 0)
    assert not ok  # nothing to delete


async def test_compare_and_set_lets_exactly_one_of_many_win(store):
    results = await asyncio.gather(
        *(store.compare_and_set("ns", "leader", str(i).encode(), 0) for i in range(8))
    )
    winners = [kv for ok, kv in results if ok]
    assert len(winners) == 1
    got = await store.get("ns", "leader")
    assert got is not None and winners[0] is not None and got.value == winners[0].value


async def test_ttl_expires_the_key(store):
    await store.put("ns", "short", b"v", ttl=0.5)
    await store.put("ns", "long", b"v")
    kv = await store.get("ns", "short")
    assert kv is not None and kv.expires_at > time.time()
    for _ in range(100):  # at most 10 s
        if await store.get("ns", "short") is None:
            break
        await asyncio.sleep(0.1)
    assert await store.get("ns", "short") is None
    items, _ = await store.list("ns")
    assert [i.key for i in items] == ["long"]
    # a put without ttl clears it
    await store.put("ns", "k", b"v", ttl=0.3)
    await store.put("ns", "k", b"w")
    await asyncio.sleep(0.6)
    got = await store.get("ns", "k")
    assert got is not None and got.expires_at == 0


async def test_bad_input_is_refused_and_nothing_is_written(store):
    with pytest.raises(InvalidValue, match=f"over storage.max_value_bytes \\({MAX_VALUE}\\)"):
        await store.put("ns", "big", b"x" * (MAX_VALUE + 1))
    with pytest.raises(InvalidValue, match="max_value_bytes"):
        await store.compare_and_set("ns", "big", b"x" * (MAX_VALUE + 1), 0)
    assert await store.get("ns", "big") is None
    await store.put("ns", "edge", b"x" * MAX_VALUE)  # the cap itself is fine
    with pytest.raises(InvalidValue, match="key: must not be empty"):
        await store.put("ns", "", b"v")
    with pytest.raises(InvalidValue, match="key: 1025 bytes"):
        await store.put("ns", "k" * 1025, b"v")
    with pytest.raises(InvalidValue, match="namespace"):
        await store.put("../etc", "k", b"v")
    with pytest.raises(InvalidValue, match="ttl"):
        await store.put("ns", "k", b"v", ttl=-1)
    items, _ = await store.list("ns")
    assert [kv.key for kv in items] == ["edge"]


async def _take(events: AsyncIterator[StorageEvent], n: int) -> list[StorageEvent]:
    got = []
    async with asyncio.timeout(10):
        async for ev in events:
            got.append(ev)
            if len(got) == n:
                break
    return got


async def test_watch_a_prefix_from_now(store):
    _, rev = await store.list("ns")
    watch = store.watch("ns", "jobs/")
    taking = asyncio.ensure_future(_take(watch, 3))
    await asyncio.sleep(0.3)  # the watch is subscribed (a late one replays from rev below)
    await store.put("ns", "jobs/1", b"a")
    await store.put("ns", "other", b"-")
    await store.put("other", "jobs/1", b"-")
    await store.put("ns", "jobs/2", b"b")
    await store.delete("ns", "jobs/1")
    events = await taking
    await watch.aclose()
    assert [(e.kind, e.kv.key, e.kv.value) for e in events] == [
        ("put", "jobs/1", b"a"),
        ("put", "jobs/2", b"b"),
        ("delete", "jobs/1", b""),
    ]
    revs = [e.revision for e in events]
    assert revs == sorted(revs) and revs[0] > rev


async def test_watch_from_a_revision_replays_then_follows(store):
    start = await store.put("ns", "p/0", b"0")
    await store.put("ns", "p/1", b"1")
    await store.put("ns", "p/2", b"2")
    watch = store.watch("ns", "p/", after=start.mod_revision)
    taking = asyncio.ensure_future(_take(watch, 3))
    await asyncio.sleep(0.3)
    await store.put("ns", "p/3", b"3")
    events = await taking
    await watch.aclose()
    assert [e.kv.key for e in events] == ["p/1", "p/2", "p/3"]


async def test_watch_sees_a_ttl_run_out(store):
    kv = await store.put("ns", "lease/a", b"v", ttl=0.5)
    watch = store.watch("ns", "lease/", after=kv.mod_revision)
    events = await _take(watch, 1)
    await watch.aclose()
    assert [(e.kind, e.kv.key) for e in events] == [("delete", "lease/a")]


def test_a_plugin_adds_a_storage_but_cannot_take_sqlite(tmp_path):
    import hsu
    from hsu._kernel.plugins import PluginManager
    from hsu.errors import ConflictError
    from hsu_plugins.storage import sqlite

    pm = PluginManager.load(env={}, autoload=False)
    made: list[object] = []

    class Mine:
        @hsu.hookimpl
        def hsu_register_storages(self, register):
            register("mine", lambda kernel: made.append(kernel) or SqliteStorage(tmp_path / "m"))

    class Clash:
        @hsu.hookimpl
        def hsu_register_storages(self, register):
            register("sqlite", lambda kernel: SqliteStorage(tmp_path / "c"))

    pm.register(Mine(), "mine")
    assert isinstance(pm.storage("mine")("k"), SqliteStorage)
    assert made == ["k"]
    assert pm.default("storage") == "sqlite"
    with pytest.raises(ConflictError, match="storage 'sqlite' is registered by plugin 'sqlite'"):
        pm.register(Clash(), "clash")
    assert pm.storage(None) is sqlite.create


# -- a kernel on each storage -------------------------------------------------------


@attrs.frozen
class Backend:
    """A storage for a kernel: its deployment lines, and its server (redis)."""

    name: str
    yaml: str
    raw: dict[str, Any]
    server: LocalRedis | None = None
    cluster: LocalCluster | None = None

    def crash(self) -> None:
        """SIGKILL the storage's server (if it has one)."""
        if self.server is not None:
            self.server.kill()
        if self.cluster is not None:
            for m in self.cluster.members:
                self.cluster.stop_member(m, signal.SIGKILL)

    def restart(self) -> None:
        if self.server is not None:
            self.server.start()  # the same port and files: it replays its append-only file
        if self.cluster is not None:
            self.cluster.start()  # the same data dirs


@pytest.fixture(params=["sqlite", "redis", "etcd"])
def backend(request: Any, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", "", {})
        return
    if request.param == "etcd":
        need_etcd()
        cluster = LocalCluster(tmp_path / "etcd", 1)
        try:
            cluster.start()
            (endpoint,) = cluster.endpoints
            yield Backend(
                "etcd",
                "plugins: [hsu_plugin_etcd]\nkernel: {storage: etcd}\n"
                f"etcd: {{endpoints: ['{endpoint}']}}\n",
                {
                    "plugins": ["hsu_plugin_etcd"],
                    "kernel": {"storage": "etcd"},
                    "etcd": {"endpoints": [endpoint]},
                },
                cluster=cluster,
            )
        finally:
            cluster.stop()
        return
    need_redis()
    # appendfsync always: an acknowledged write is on disk when redis-server dies
    server = LocalRedis(tmp_path / "redis", durable=True)
    server.start()
    try:
        yield Backend(
            "redis",
            "plugins: [hsu_plugin_redis]\nkernel: {storage: redis}\n"
            f"redis: {{address: '{server.address}', timeout: 3}}\n",
            {
                "plugins": ["hsu_plugin_redis"],
                "kernel": {"storage": "redis"},
                "redis": {"address": server.address},
            },
            server,
        )
    finally:
        server.stop()
        assert server.proc is None


async def test_every_acknowledged_put_survives_sigkill(tmp_path, kernel_process, backend):
    """A burst of puts over the service; SIGKILL the kernel (and redis-server, etcd)
    in the middle; after a restart every put that was acknowledged is there."""
    path = write_deployment(tmp_path / "d.yaml", f"name: burst\nunits: {{}}\n{backend.yaml}")
    k = kernel_process(path)
    await asyncio.to_thread(k.wait_ready)
    acked = -1
    async with grpc.aio.insecure_channel(k.address) as ch:
        stub = storage_pb2_grpc.StorageStub(ch)

        async def burst() -> None:
            nonlocal acked
            for i in range(100_000):
                await stub.Put(
                    storage_pb2.PutRequest(namespace="b", key=f"k{i:06d}", value=b"v"), timeout=10
                )
                acked = i

        writer = asyncio.ensure_future(burst())
        for _ in range(600):  # at most 60 s
            if acked >= 300 or writer.done():
                break
            await asyncio.sleep(0.1)
        k.proc.kill()
        backend.crash()
        with pytest.raises(grpc.aio.AioRpcError):
            await writer
    await asyncio.to_thread(k.proc.wait)
    assert acked >= 300
    backend.restart()
    again = kernel_process(path)
    await asyncio.to_thread(again.wait_ready)
    client = StorageClient(again.address)
    try:
        items, _ = await client.list("b")
    finally:
        await client.close()
    keys = {kv.key for kv in items}
    missing = [i for i in range(acked + 1) if f"k{i:06d}" not in keys]
    assert missing == []


async def test_a_unit_cannot_read_another_units_namespace(hsu_kernel_factory, backend) -> None:
    from test_storage_service import run, units

    kernel = await hsu_kernel_factory({"name": "ns", "units": units(), **backend.raw})
    assert kernel.storage is not None
    assert type(kernel.storage).__name__.lower().startswith(backend.name)
    assert isinstance((await run(kernel, "a", op="put", key="k", value="of a"))["result"], int)
    assert await run(kernel, "b", op="get", key="k") == {"result": None}
    stolen = await run(kernel, "b", op="get", ns="a", key="k")
    assert stolen["error"] == "NotAllowed"
    assert (await run(kernel, "b", op="list", ns="a"))["error"] == "NotAllowed"
    assert (await run(kernel, "b", op="put", ns="a", key="k", value="b"))["error"] == "NotAllowed"
    assert (await run(kernel, "b", op="list", ns="hsu.kernel"))["error"] == "NotAllowed"
    assert await run(kernel, "a", op="get", key="k") == {"result": "of a"}


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_redis_killed_mid_run_fails_calls_cleanly(tmp_path, kernel_process) -> None:
    """redis-server dies: every storage call is UNAVAILABLE naming its address,
    a put that failed is not there afterwards, the kernel stays SERVING; when
    the server is back, so is the storage."""
    need_redis()
    server = LocalRedis(tmp_path / "redis", durable=True)
    server.start()
    try:
        path = write_deployment(
            tmp_path / "d.yaml",
            "name: down\nunits: {}\nplugins: [hsu_plugin_redis]\nkernel: {storage: redis}\n"
            f"redis: {{address: '{server.address}', connect_timeout: 1, timeout: 2}}\n",
        )
        k = kernel_process(path)
        await asyncio.to_thread(k.wait_ready)
        async with grpc.aio.insecure_channel(k.address) as ch:
            stub = storage_pb2_grpc.StorageStub(ch)
            put = await stub.Put(storage_pb2.PutRequest(namespace="a", key="k", value=b"1"))
            assert put.kv.mod_revision > 0
            server.kill()
            calls = {
                "Put": stub.Put(storage_pb2.PutRequest(namespace="a", key="lost", value=b"x")),
                "Get": stub.Get(storage_pb2.GetRequest(namespace="a", key="k")),
                "List": stub.List(storage_pb2.ListRequest(namespace="a")),
                "Delete": stub.Delete(storage_pb2.DeleteRequest(namespace="a", key="k")),
                "CompareAndSet": stub.CompareAndSet(
                    storage_pb2.CompareAndSetRequest(
                        namespace="a", key="k", value=b"2", revision=put.kv.mod_revision
                    )
                ),
            }
            for method, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE, method
                assert f"redis at redis://{server.address}/0" in err.value.details(), method
                assert "nothing was written" in err.value.details() or method in ("Get", "List")
            watch = stub.Watch(storage_pb2.WatchRequest(namespace="a"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in watch:
                    pass
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert await asyncio.to_thread(_serving, k.address)
            assert k.proc.poll() is None
            # back again: what was acknowledged is there, what failed is not
            server.start()
            got = await stub.Get(storage_pb2.GetRequest(namespace="a", key="k"))
            assert got.found and got.kv.value == b"1"
            lost = await stub.Get(storage_pb2.GetRequest(namespace="a", key="lost"))
            assert not lost.found
            again = await stub.Put(storage_pb2.PutRequest(namespace="a", key="k", value=b"3"))
            assert again.kv.mod_revision > put.kv.mod_revision
        assert await asyncio.to_thread(_serving, k.address)
    finally:
        server.stop()


async def test_a_kernel_starts_with_redis_down_and_uses_it_once_up(tmp_path, kernel_process):
    need_redis()
    server = LocalRedis(tmp_path / "redis")  # its port chosen, nothing listening yet
    try:
        path = write_deployment(
            tmp_path / "d.yaml",
            "name: late\nunits: {}\nplugins: [hsu_plugin_redis]\nkernel: {storage: redis}\n"
            f"redis: {{address: '{server.address}', connect_timeout: 1}}\n",
        )
        k = kernel_process(path)
        await asyncio.to_thread(k.wait_ready)
        async with grpc.aio.insecure_channel(k.address) as ch:
            stub = storage_pb2_grpc.StorageStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Put(storage_pb2.PutRequest(namespace="a", key="k", value=b"1"))
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert f"redis at redis://{server.address}/0 is unavailable" in err.value.details()
            assert "nothing was written" in err.value.details()
            await asyncio.to_thread(server.start)
            put = await stub.Put(storage_pb2.PutRequest(namespace="a", key="k", value=b"1"))
            got = await stub.Get(storage_pb2.GetRequest(namespace="a", key="k"))
            assert got.found and got.kv.mod_revision == put.kv.mod_revision
        assert await asyncio.to_thread(_serving, k.address)
        _, err_text = k.output()
        assert f"redis at redis://{server.address}/0" in err_text  # the records' error, logged
    finally:
        server.stop()


async def test_etcd_down_mid_run_fails_calls_cleanly(tmp_path, kernel_process) -> None:
    """The etcd storage's cluster stops: calls fail UNAVAILABLE naming its
    endpoints within etcd.timeout, the kernel stays SERVING, and once the
    cluster is back what was acknowledged is there."""
    need_etcd()
    cluster = LocalCluster(tmp_path / "etcd", 1)
    try:
        await asyncio.to_thread(cluster.start)
        (endpoint,) = cluster.endpoints
        path = write_deployment(
            tmp_path / "d.yaml",
            "name: edown\nunits: {}\nplugins: [hsu_plugin_etcd]\nkernel: {storage: etcd}\n"
            f"etcd: {{endpoints: ['{endpoint}'], timeout: 1.0}}\n",
        )
        k = kernel_process(path)
        await asyncio.to_thread(k.wait_ready)
        async with grpc.aio.insecure_channel(k.address) as ch:
            stub = storage_pb2_grpc.StorageStub(ch)
            put = await stub.Put(storage_pb2.PutRequest(namespace="a", key="k", value=b"1"))
            await asyncio.to_thread(cluster.stop_member, cluster.members[0], signal.SIGKILL)
            for call in (
                stub.Put(storage_pb2.PutRequest(namespace="a", key="k2", value=b"x")),
                stub.Get(storage_pb2.GetRequest(namespace="a", key="k")),
                stub.List(storage_pb2.ListRequest(namespace="a")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                assert f"etcd at {endpoint} is unavailable" in err.value.details()
            assert await asyncio.to_thread(_serving, k.address)
            await asyncio.to_thread(cluster.start)
            got = None
            for _ in range(100):  # the kernel's channel reconnects (bounded: 10 s or so)
                try:
                    got = await stub.Get(storage_pb2.GetRequest(namespace="a", key="k"))
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            assert got is not None and got.found and got.kv.mod_revision == put.kv.mod_revision
    finally:
        cluster.stop()
