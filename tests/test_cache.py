"""Caches (docs/cache.md): the memory layer's LRU by bytes and TTLs, layers
filled from below, routed replies served from the cache by the gateway and
by hsu.connect (counted at a real HSU), and the Cache service's namespaces.
Real kernels, real HSU processes, real gRPC on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from conftest import until
from hsu.cache import Layers, MemoryCache, reply_key
from hsu.cache._memory import ENTRY_OVERHEAD
from hsu.errors import ConfigError
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.gateway import python as gateway_python

ECHO = "hsu.echo.v1.Echo"
METHOD = f"/{ECHO}/Echo"
HSU = str(Path(__file__).with_name("hsu_cached.py"))


def deployment(log: Path, routing_cache: dict[str, Any] | None, **more: Any) -> dict[str, Any]:
    unit: dict[str, Any] = {
        "command": [sys.executable, HSU],
        "interfaces": [ECHO],
        "env": {"HSU_CACHED_LOG": str(log)},
        "start": "at-start",
        "stop_grace": 5,
    }
    if routing_cache is not None:
        unit["routing"] = {"cache": routing_cache}
    return {"name": "cache", "units": {"lookup": unit}, **more}


def reached(log: Path) -> list[str]:
    """The messages that reached the HSU, in order."""
    return log.read_text().splitlines() if log.exists() else []


async def gateway_ready(kernel: Any, stub: Any) -> None:
    """The gateway learns a method's kind from the HSU's reflection on its
    first call (which goes as a stream); from then on Echo is unary."""
    gw = kernel.plugin(gateway_python.PLANE)
    await stub.Echo(echo_pb2.EchoRequest(message="learn"), timeout=20)
    await until(lambda: METHOD in gw.kinds)


# -- the memory layer -------------------------------------------------------------


async def test_the_memory_lru_evicts_by_bytes_least_recently_used_first() -> None:
    each = 1000 + ENTRY_OVERHEAD + 2  # a 2-character key, a 1000-byte value
    cache = MemoryCache(max_bytes=3 * each)
    for k in ("k1", "k2", "k3"):
        await cache.set(k, b"x" * 1000)
    assert cache.stats().bytes == 3 * each and cache.stats().evictions == 0
    assert await cache.get("k1") is not None  # k1 is now the most recent
    await cache.set("k4", b"y" * 1000)  # one must go: k2, the least recently used
    assert await cache.get("k2") is None
    assert [await cache.get(k) is not None for k in ("k1", "k3", "k4")] == [True] * 3
    # a value twice as big pushes out two
    await cache.set("k5", b"z" * (2 * 1000 + ENTRY_OVERHEAD + 2))
    st = cache.stats()
    assert st.evictions == 3 and st.entries == 2 and st.bytes <= 3 * each
    assert await cache.get("k5") is not None
    # larger than the whole cache: not kept, nothing evicted for it
    await cache.set("huge", b"h" * (4 * each))
    assert await cache.get("huge") is None and cache.stats().evictions == 3
    assert cache.stats().hits >= 5 and cache.stats().misses >= 2


async def test_a_memory_value_expires_after_its_ttl() -> None:
    cache = MemoryCache(max_bytes=10_000)
    await cache.set("short", b"v", ttl=0.2)
    await cache.set("long", b"w")
    hit = await cache.get("short")
    assert hit is not None and hit.value == b"v" and hit.ttl is not None and hit.ttl <= 0.2
    await asyncio.sleep(0.3)
    assert await cache.get("short") is None
    assert (await cache.get("long")) is not None
    assert cache.stats().entries == 1 and cache.stats().evictions == 0


async def test_a_miss_in_the_first_layer_is_filled_from_the_second() -> None:
    top, below = MemoryCache(10_000), MemoryCache(10_000)
    layers = Layers([("top", top), ("below", below)], fill_ttl=5)
    await below.set("k", b"from below", ttl=30)
    await below.set("forever", b"no ttl")
    hit = await layers.get("k")
    assert hit is not None and hit.value == b"from below"
    filled = await top.get("k")
    assert filled is not None and filled.value == b"from below"
    assert filled.ttl is not None and 5 < filled.ttl <= 30  # the lower layer's TTL, not fill_ttl
    assert (await layers.get("forever")) is not None
    kept = await top.get("forever")
    assert kept is not None and kept.ttl is not None and kept.ttl <= 5  # fill_ttl
    assert await layers.get("nowhere") is None
    await layers.set("both", b"v", ttl=10)
    assert (await top.get("both")) is not None and (await below.get("both")) is not None
    assert await layers.delete("both") and await top.get("both") is None
    assert layers.stats().hits == 2 and layers.stats().misses == 1


def test_reply_keys_differ_by_method_request_and_listed_metadata_only() -> None:
    base = reply_key(METHOD, b"req", [("tenant", "a"), ("x-trace", "1")], ["tenant"])
    assert base == reply_key(METHOD, b"req", [("tenant", "a"), ("x-trace", "2")], ["tenant"])
    assert base != reply_key(METHOD, b"req", [("tenant", "b")], ["tenant"])
    assert base != reply_key(METHOD, b"req", [], ["tenant"])
    assert base != reply_key(METHOD, b"other", [("tenant", "a")], ["tenant"])
    assert base != reply_key(f"/{ECHO}/Other", b"req", [("tenant", "a")], ["tenant"])
    assert base.startswith("hsu.reply/")


# -- routed replies through the gateway ---------------------------------------------


async def test_the_gateway_serves_a_repeated_call_from_the_cache(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory(
        deployment(log, {"methods": ["Echo"], "ttl": "30s", "key_metadata": ["tenant"]})
    )
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await gateway_ready(kernel, stub)
        first = await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        again = [await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20) for _ in range(5)]
        # one call reached the HSU; five were answered by the kernel with its reply
        assert reached(log).count("q") == 1
        assert all(r == first for r in again)
        # another request is another key
        await stub.Echo(echo_pb2.EchoRequest(message="r"), timeout=20)
        assert reached(log).count("r") == 1
        # key_metadata separates tenants; the reply is each one's own
        md_a, md_b = (("tenant", "a"),), (("tenant", "b"),)
        a = await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=md_a, timeout=20)
        b = await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=md_b, timeout=20)
        a2 = await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=md_a, timeout=20)
        b2 = await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=md_b, timeout=20)
        assert (a.instance_id, b.instance_id) == ("a", "b")
        assert (a2, b2) == (a, b)
        assert reached(log).count("t") == 2
        # metadata not listed is not part of the key
        await stub.Echo(echo_pb2.EchoRequest(message="q"), metadata=(("x-other", "1"),))
        assert reached(log).count("q") == 1
        # non-OK replies are never cached: each failing call reaches the HSU
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Echo(echo_pb2.EchoRequest(message="fail"), timeout=20)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert reached(log).count("fail") == 3
    stats = kernel.cache.stats()
    assert stats.hits >= 7
    families = {f.name: f for f in kernel.metrics.collect()}
    hits = families["hsu_cache_hits_total"].points
    assert hits[0].labels == (("layer", "memory"),) and hits[0].value >= 7


async def test_a_cached_reply_expires_after_its_ttl(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory(deployment(log, {"methods": ["Echo"], "ttl": "2s"}))
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await gateway_ready(kernel, stub)
        t0 = time.monotonic()
        first = await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        cached = await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        assert cached == first and reached(log).count("q") == 1
        await asyncio.sleep(max(0.0, 2.2 - (time.monotonic() - t0)))
        fresh = await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        assert reached(log).count("q") == 2
        assert fresh.pid > first.pid  # the HSU's own count: a new reply


async def test_a_unit_without_routing_cache_is_never_cached(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory(deployment(log, None))
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await gateway_ready(kernel, stub)
        for _ in range(3):
            await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
    assert reached(log).count("q") == 3


async def test_without_cache_layers_calls_are_forwarded(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory(deployment(log, {"methods": ["Echo"]}, kernel={"caches": []}))
    assert kernel.cache is None
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await gateway_ready(kernel, stub)
        for _ in range(2):
            await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
    assert reached(log).count("q") == 2


# -- routed replies through hsu.connect ----------------------------------------------


async def test_hsu_connect_keeps_its_own_reply_cache(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory(
        deployment(
            log,
            {"methods": ["hsu.echo.v1.Echo/Echo"], "key_metadata": ["tenant"]},
            kernel={"caches": []},
        )
    )
    async with hsu.connect(kernel.control_address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        first = await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        for _ in range(4):
            assert await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20) == first
        assert reached(log).count("q") == 1
        a = await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=(("tenant", "a"),))
        b = await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=(("tenant", "b"),))
        assert (a.instance_id, b.instance_id) == ("a", "b")
        assert await stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=(("tenant", "b"),)) == b
        assert reached(log).count("t") == 2
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Echo(echo_pb2.EchoRequest(message="fail"), timeout=20)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert reached(log).count("fail") == 2
        cache = channel.reply_cache()
        assert cache is not None and cache.stats().hits == 5
    # another channel has its own cache: the call reaches the HSU again
    async with hsu.connect(kernel.control_address, cache_bytes=0) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        assert channel.reply_cache() is None
    assert reached(log).count("q") == 3


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"methods": []}, "units.lookup.routing.cache.methods"),
        ({"methods": ["Echo"], "ttl": "soon"}, "units.lookup.routing.cache.ttl"),
        ({"methods": ["Echo"], "ttl": 0}, "units.lookup.routing.cache.ttl"),
        ({"methods": ["Echo"], "key_metadata": ["Tenant"]}, "lower case"),
        ({"methods": ["Echo"], "key_metadata": ["authorization"]}, "kernel's own"),
        ({"methods": ["Echo"], "ttls": 3}, "ttls"),
    ],
)
def test_routing_cache_is_checked_where_it_is_written(
    cache: dict[str, Any], message: str, tmp_path: Path
) -> None:
    from hsu.testing import build_kernel

    with pytest.raises(ConfigError) as info:
        build_kernel(deployment(tmp_path / "log", cache), base_dir=str(tmp_path))
    assert message in str(info.value)


def test_kernel_caches_names_registered_layers(tmp_path: Path) -> None:
    from hsu.errors import PluginError
    from hsu.testing import build_kernel

    with pytest.raises(
        PluginError, match=r"kernel.caches: no cache named 'nope' \(registered: memory"
    ):
        build_kernel(deployment(tmp_path / "log", None, kernel={"caches": ["memory", "nope"]}),
                     base_dir=str(tmp_path))  # fmt: skip


# -- the Cache service ----------------------------------------------------------------

OPS = str(Path(__file__).with_name("hsu_cache_ops.py"))


async def run(kernel: Any, unit: str, **cmd: Any) -> dict[str, Any]:
    """Have an instance of ``unit`` run one cache call through worker.cache."""
    (inst,) = [i for i in kernel.instances.values() if i.unit == unit]
    async with grpc.aio.insecure_channel(inst.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(
            echo_pb2.EchoRequest(message=json.dumps(cmd)), timeout=20
        )
    out: dict[str, Any] = json.loads(reply.message)
    return out


async def test_the_cache_service_keeps_each_unit_to_its_namespace(
    hsu_kernel_factory: Any,
) -> None:
    unit = {"command": [sys.executable, OPS], "interfaces": [ECHO], "start": "at-start",
            "stop_grace": 5}  # fmt: skip
    kernel = await hsu_kernel_factory(
        {
            "name": "cs",
            "units": {"a": unit, "b": dict(unit)},
            "cache": {"max_value_bytes": 1000},
        }
    )
    assert await run(kernel, "a", op="set", key="k", value="from a", ttl=60) == {"result": True}
    assert await run(kernel, "a", op="get", key="k") == {"result": "from a"}
    assert await run(kernel, "b", op="get", key="k") == {"result": None}  # b's own is empty
    # the attack: b names a's namespace, or the kernel's replies
    stolen = await run(kernel, "b", op="get", ns="a", key="k")
    assert stolen["error"] == "NotAllowed"
    assert "unit 'b' may use its own namespace 'b' only, not 'a'" in stolen["message"]
    assert (await run(kernel, "b", op="set", ns="a", key="k", value="b's"))["error"] == "NotAllowed"
    assert (await run(kernel, "b", op="delete", ns="a", key="k"))["error"] == "NotAllowed"
    assert (await run(kernel, "b", op="get", ns="hsu.reply", key="x"))["error"] == "NotAllowed"
    assert await run(kernel, "a", op="get", key="k") == {"result": "from a"}
    # oversized: INVALID_ARGUMENT, nothing kept
    big = await run(kernel, "a", op="set", key="big", value="x", repeat=1001)
    assert big["error"] == "InvalidValue"
    assert "1001 bytes, over cache.max_value_bytes (1000)" in big["message"]
    assert await run(kernel, "a", op="get", key="big") == {"result": None}
    # the unit's key is in the kernel's layers under its namespace
    hit = await kernel.cache.get("a/k")
    assert hit is not None and hit.value == b"from a"
    # an operator on the control plane names the namespace, never the kernel's
    from hsu.cache import CacheClient
    from hsu.errors import NotAllowed

    op = CacheClient(kernel.control_address, namespace="a")
    try:
        got = await op.get("k")
        assert got is not None and got.value == b"from a" and got.ttl is not None
        assert await op.delete("k") is True
        assert await run(kernel, "a", op="get", key="k") == {"result": None}
    finally:
        await op.close()
    kernels = CacheClient(kernel.control_address, namespace="hsu.reply")
    try:
        with pytest.raises(NotAllowed, match=r"'hsu\.reply' is the kernel's own"):
            await kernels.get("x")
    finally:
        await kernels.close()


# -- a layer from a plugin, and one that fails ------------------------------------------


class GoneLayer:
    """A plugin whose layer is the Cache service of a kernel that is not
    there (a unix socket nobody listens on): every call fails."""

    def __init__(self, socket: Path):
        self.socket = socket

    @hsu.hookimpl
    def hsu_register_caches(self, register: Any) -> None:
        from hsu.cache import CacheClient

        register("gone", lambda kernel: CacheClient(f"unix:{self.socket}", namespace="x"))


async def test_a_failing_layer_is_skipped_and_counted_never_failing_the_call(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory(
        deployment(
            log,
            {"methods": ["Echo"]},
            kernel={"caches": ["gone", "memory"]},
            cache={"retry_after": 0},
        ),
        plugins=[GoneLayer(tmp_path / "nobody.sock")],
    )
    assert [name for name, _ in kernel.cache.layers] == ["gone", "memory"]
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await gateway_ready(kernel, stub)
        replies = [await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20) for _ in range(4)]
    assert len(set(map(bytes, (r.SerializeToString() for r in replies)))) == 1
    assert reached(log).count("q") == 1  # the memory layer answered the rest
    stats = dict(kernel.cache.layer_stats())
    assert stats["gone"].errors >= 4 and stats["memory"].hits == 3
    families = {f.name: f for f in kernel.metrics.collect()}
    errors = {p.labels: p.value for p in families["hsu_cache_errors_total"].points}
    assert errors[(("layer", "gone"),)] >= 4


def test_hsu_connect_sync_keeps_its_own_reply_cache(kernel_process: Any, tmp_path: Path) -> None:
    """The blocking channel, with threads sharing its cache, against a kernel process."""
    import concurrent.futures

    import yaml

    log = tmp_path / "calls"
    path = tmp_path / "d.yaml"
    raw = deployment(log, {"methods": ["Echo"], "key_metadata": ["tenant"]}, kernel={"caches": []})
    path.write_text(yaml.safe_dump(raw))
    k = kernel_process(path)
    k.wait_ready()
    with hsu.connect_sync(k.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        first = stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            again = list(
                pool.map(lambda _: stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20),
                         range(8))
            )  # fmt: skip
        assert all(r == first for r in again)
        assert reached(log).count("q") == 1
        a = stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=(("tenant", "a"),), timeout=20)
        b = stub.Echo(echo_pb2.EchoRequest(message="t"), metadata=(("tenant", "b"),), timeout=20)
        assert (a.instance_id, b.instance_id) == ("a", "b")
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                stub.Echo(echo_pb2.EchoRequest(message="fail"), timeout=20)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert reached(log).count("fail") == 2
        assert channel.reply_cache().stats().hits == 8
