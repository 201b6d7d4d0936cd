"""The ``redis`` cache layer (docs/cache.md): values in a Redis server that
several kernels (and, over ``hsu.cache.v1.Cache``, their HSUs) share.

Stack it under the kernel's own memory layer, ``kernel.caches: [memory,
redis]``: a call answered by memory never reaches Redis, a miss there is
filled from Redis, and a Redis that is down is a failed layer that
:class:`hsu.cache.Layers` skips (the kernel's memory layer goes on serving).

Keys are ``PREFIX + key``; a TTL is Redis's own (``SET ... PX``), so a
value expires on the server whoever wrote it. A get is one round trip
(``GET`` and ``PTTL`` pipelined). Commands are not retried and time out
after ``timeout``: a layer that fails is skipped, and waiting on it would
cost every call that time.

Settings, section ``redis_cache``::

    redis_cache:
      url: redis://127.0.0.1:6379/0     # or rediss://, unix:///path/redis.sock
      prefix: "hsu:"
      timeout: 250ms
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs

import hsu
from hsu.config import Seconds
from hsu.errors import CacheError
from hsu.ports import Cache, Cached, CacheStats, KernelAPI, Register

#: the settings section's name (this plugin's entry point name)
SECTION = "redis_cache"


def _url(instance: Any, attribute: Any, value: str) -> None:
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{redact(value)!r}: a redis://, rediss:// or unix:// URL")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@attrs.frozen
class RedisCacheSettings:
    #: the server (a password in it is never logged)
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_url)
    #: every key starts with it, so several deployments can share a server
    prefix: str = attrs.field(default="hsu:", validator=attrs.validators.max_len(256))
    #: how long a command (or a connect) may take before the layer failed
    timeout: Seconds = attrs.field(default=0.25, validator=attrs.validators.gt(0))


class RedisCache:
    """:class:`hsu.ports.Cache` in a Redis server, over redis-py's asyncio client."""

    def __init__(self, url: str, *, prefix: str = "hsu:", timeout: float = 0.25):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.prefix = prefix
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self.hits = self.misses = 0

    @property
    def describe(self) -> str:
        return redact(self.url)

    def _failed(self, what: str, exc: Exception) -> CacheError:
        return CacheError(f"redis at {self.describe}: {what}: {exc}")

    async def get(self, key: str) -> Cached | None:
        from redis.exceptions import RedisError

        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self.prefix + key)
                pipe.pttl(self.prefix + key)
                value, pttl = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._failed("GET", exc) from exc
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return Cached(bytes(value), pttl / 1000 if pttl > 0 else None)

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        from redis.exceptions import RedisError

        px = None if ttl is None else max(1, int(ttl * 1000))
        try:
            await self._client.set(self.prefix + key, value, px=px)
        except (RedisError, OSError) as exc:
            raise self._failed("SET", exc) from exc

    async def delete(self, key: str) -> bool:
        from redis.exceptions import RedisError

        try:
            return bool(await self._client.delete(self.prefix + key))
        except (RedisError, OSError) as exc:
            raise self._failed("DEL", exc) from exc

    def stats(self) -> CacheStats:
        """This process's hits and misses; the server's size is not asked for."""
        return CacheStats(hits=self.hits, misses=self.misses)

    async def close(self) -> None:
        await self._client.aclose()


def create(kernel: KernelAPI) -> Cache:
    s: RedisCacheSettings = kernel.settings(SECTION)
    return RedisCache(s.url, prefix=s.prefix, timeout=s.timeout)


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, RedisCacheSettings)


@hsu.hookimpl
def hsu_register_caches(register: Register[Callable[[KernelAPI], Cache]]) -> None:
    register("redis", create)
