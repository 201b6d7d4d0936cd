"""The ``redis`` section: a bad one is a config error naming the field and
saying what a good one looks like; a unix socket works as well as a port."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import hsu_plugin_redis
import pytest
from hsu_plugin_redis.server import LocalRedis, redis_executable
from hsu_plugin_redis.settings import RedisSettings
from hsu_plugin_redis.storage import RedisStorage

from hsu.errors import ConfigError, StorageUnavailable
from hsu.ports import StorageCompacted
from hsu.testing import build_kernel


def need_redis() -> None:
    if redis_executable() is None:
        if os.environ.get("HSU_REQUIRE_REDIS") == "1":
            pytest.fail("HSU_REQUIRE_REDIS=1 but there is no redis-server (Debian: redis-server)")
        pytest.skip("redis-server is not installed (Debian: redis-server)")


@pytest.mark.parametrize(
    ("section", "field", "why"),
    [
        ({"address": "localhost"}, "address", "'localhost' is not host:port"),
        ({"address": "::1:6379"}, "address", "put an IPv6 host in brackets"),
        ({"address": "[nope]:6379"}, "address", "'nope' is not an IPv6 address"),
        ({"address": "127.0.0.1:70000"}, "address", "is not host:port"),
        ({"address": "unix:redis.sock"}, "address", "must be absolute"),
        ({"address": "unix:/" + "x" * 120}, "address", "over the 107 bytes"),
        ({"db": -1}, "db", ""),
        ({"prefix": "has space"}, "prefix", "is not 1 to 64 of letters"),
        ({"timeout": 0}, "timeout", ""),
        ({"password_file": "relative"}, "password_file", "must be an absolute path"),
        ({"adress": "127.0.0.1:6379"}, "adress", ""),
    ],
)
def test_a_bad_section_is_a_config_error_naming_the_field(section, field, why) -> None:
    with pytest.raises(ConfigError) as info:
        build_kernel({"kernel": {"storage": "redis"}, "redis": section}, plugins=[hsu_plugin_redis])
    message = str(info.value)
    assert f"redis.{field}" in message and why in message, message


def test_describe_names_the_server() -> None:
    assert RedisSettings().describe() == "redis://127.0.0.1:6379/0"
    assert RedisSettings(address="[::1]:7000", db=3).describe() == "redis://[::1]:7000/3"
    assert RedisSettings(address="unix:/run/r.sock").describe() == "redis+unix:/run/r.sock?db=0"


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    with pytest.raises(Exception, match="only its owner may read") as info:
        RedisSettings(password_file=str(secret)).password()
    assert "s3cret" not in str(info.value)
    secret.chmod(0o600)
    assert RedisSettings(password_file=str(secret)).password() == "s3cret"


async def test_on_a_unix_socket_and_down(tmp_path: Path) -> None:
    need_redis()
    server = LocalRedis(tmp_path / "r", unix=True)
    server.start()
    store = RedisStorage(RedisSettings(address=server.address, db=2, prefix="t:"))
    try:
        kv = await store.put("ns", "k", b"v")
        got = await store.get("ns", "k")
        assert got is not None and got.mod_revision == kv.mod_revision
        server.stop()
        await asyncio.sleep(0.2)  # the client's loop sees the server close its connection
        with pytest.raises(StorageUnavailable) as info:
            await store.put("ns", "k2", b"v")
        assert f"redis at redis+unix:{server.socket}?db=2" in str(info.value)
        assert "nothing was written" in str(info.value)
    finally:
        await store.close()
        server.stop()


async def test_a_watch_from_a_trimmed_revision_is_compacted(tmp_path: Path) -> None:
    """The streams keep the last ``history`` revisions: a watch from before
    them raises StorageCompacted with the oldest one kept; from within, it
    replays."""
    need_redis()
    server = LocalRedis(tmp_path / "r")
    server.start()
    store = RedisStorage(RedisSettings(address=server.address, history=3))
    try:
        revs = [(await store.put("ns", f"k{i}", b"v")).mod_revision for i in range(10)]
        with pytest.raises(StorageCompacted) as info:
            async for _ in store.watch("ns", after=revs[1]):
                break
        assert info.value.compact_revision == revs[-1] - 3
        got = []
        async with asyncio.timeout(10):
            async for ev in store.watch("ns", after=info.value.compact_revision):
                got.append(ev.revision)
                if ev.revision == revs[-1]:
                    break
        assert got == [r for r in revs if r > info.value.compact_revision]
    finally:
        await store.close()
        server.stop()
