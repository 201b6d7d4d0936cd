"""The redis cache layer against a real redis-server (Debian's), started
here on a unix socket in tmp_path and stopped by pid: values, TTLs and
deletes on the server, two layers sharing it, a memory layer filled from it,
and a redis SIGKILLed mid-run: the kernel's memory layer goes on serving,
calls keep working, the failures are counted."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hsu_plugin_redis.cache import RedisCache, redact

from hsu.cache import Layers, MemoryCache
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
ROOT = Path(__file__).resolve().parents[3]
HSU = str(ROOT / "tests" / "hsu_cached.py")
ECHO = "hsu.echo.v1.Echo"
METHOD = f"/{ECHO}/Echo"


class RedisServer:
    """A real redis-server on a unix socket under ``tmp``, persisting nothing."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.socket = self.dir / "redis.sock"
        self.log = (self.dir / "log").open("w")
        self.proc = subprocess.Popen(
            [REDIS, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"unix://{self.socket}"

    async def wait_ready(self, seconds: float = 20.0) -> None:
        import redis.asyncio as aioredis

        deadline = time.monotonic() + seconds
        while True:
            if self.socket.exists():
                client = aioredis.Redis.from_url(self.url)
                try:
                    if await client.ping():
                        return
                except OSError:
                    pass
                except Exception as exc:  # redis's own ConnectionError while it starts
                    if "Connection" not in type(exc).__name__:
                        raise
                finally:
                    await client.aclose()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"redis-server did not start: {(self.dir / 'log').read_text()}"
                )
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not os.access(REDIS, os.X_OK):
        if os.environ.get("HSU_REQUIRE_REDIS") == "1":
            pytest.fail(f"HSU_REQUIRE_REDIS=1 but {REDIS} is not installed")
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()


async def test_values_ttls_and_deletes_live_on_the_server(redis_server: RedisServer) -> None:
    await redis_server.wait_ready()
    one = RedisCache(redis_server.url, prefix="t:")
    two = RedisCache(redis_server.url, prefix="t:")  # another kernel, the same server
    other = RedisCache(redis_server.url, prefix="u:")  # another deployment
    try:
        await one.set("k", b"v", ttl=30)
        hit = await two.get("k")
        assert hit is not None and hit.value == b"v" and hit.ttl is not None and 25 < hit.ttl <= 30
        assert await other.get("k") is None
        await one.set("forever", b"w")
        forever = await two.get("forever")
        assert forever is not None and forever.ttl is None
        await one.set("short", b"s", ttl=0.2)
        await asyncio.sleep(0.4)
        assert await two.get("short") is None
        assert await two.delete("k") is True and await one.get("k") is None
        assert await one.delete("k") is False
        assert two.stats().hits == 2 and two.stats().misses == 1
        # a memory layer over it is filled from it
        top = MemoryCache(10_000)
        layers = Layers([("memory", top), ("redis", one)])
        await two.set("shared", b"from two", ttl=60)
        got = await layers.get("shared")
        assert got is not None and got.value == b"from two"
        filled = await top.get("shared")
        assert filled is not None and filled.ttl is not None and 50 < filled.ttl <= 60
    finally:
        for c in (one, two, other):
            await c.close()


def test_a_password_never_shows() -> None:
    assert redact("redis://app:s3cret@127.0.0.1:6380/0") == "redis://app:***@127.0.0.1:6380/0"
    assert "s3cret" not in RedisCache("redis://app:s3cret@127.0.0.1:6380/0").describe


async def test_redis_killed_mid_run_the_memory_layer_serves_and_calls_keep_working(
    redis_server: RedisServer, hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    await redis_server.wait_ready()
    log = tmp_path / "calls"
    kernel = await hsu_kernel_factory({
        "name": "rc",
        "plugins": ["redis_cache"],
        "kernel": {"caches": ["memory", "redis"]},
        "redis_cache": {"url": redis_server.url, "timeout": "500ms"},
        "cache": {"retry_after": 0},
        "units": {"lookup": {
            "command": [sys.executable, HSU], "interfaces": [ECHO], "start": "at-start",
            "env": {"HSU_CACHED_LOG": str(log)}, "stop_grace": 5,
            "routing": {"cache": {"methods": ["Echo"], "ttl": "1m"}},
        }},
    })  # fmt: skip
    gw = kernel.plugin("gateway.python")

    def reached(message: str) -> int:
        return log.read_text().splitlines().count(message) if log.exists() else 0

    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await stub.Echo(echo_pb2.EchoRequest(message="learn"), timeout=20)
        for _ in range(200):  # the gateway learns Echo is unary from reflection
            if METHOD in gw.kinds:
                break
            await asyncio.sleep(0.05)
        before = await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20)
        # the reply is on the server: a second kernel's memory layer would fill from it
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_server.url)
        try:
            keys = await client.keys("hsu:hsu.reply/*")
        finally:
            await client.aclose()
        assert len(keys) == 1
        redis_server.kill()
        # the memory layer still answers the cached call
        assert await stub.Echo(echo_pb2.EchoRequest(message="q"), timeout=20) == before
        assert reached("q") == 1
        # new calls keep working (the redis layer skipped), and are cached in memory
        for _ in range(3):
            reply = await stub.Echo(echo_pb2.EchoRequest(message="new"), timeout=20)
            assert reply.message == "new"
        assert reached("new") == 1
    stats = dict(kernel.cache.layer_stats())
    assert stats["redis"].errors >= 1
    assert stats["memory"].hits >= 3
    assert kernel.state == "running"
