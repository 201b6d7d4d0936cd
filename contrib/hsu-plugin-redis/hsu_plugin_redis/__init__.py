"""hsu-plugin-redis: hsu on a Redis server.

Provides the ``redis`` storage (``kernel.storage: redis``) and the ``redis``
settings section (the server's address or unix socket, db, key prefix,
timeouts); ``hsu_plugin_redis.cache`` is the ``redis`` cache layer (its own
plugin, entry point ``redis_cache``; docs/cache.md).
``hsu_plugin_redis.server.LocalRedis`` starts a redis-server for tests and
benchmarks. See README.md and docs/storage.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu
from hsu.ports import KernelAPI, Register, Storage, StorageSettings
from hsu_plugin_redis.settings import RedisSettings

SECTION = "redis"

__all__ = ["SECTION", "RedisSettings", "create_storage"]


def create_storage(kernel: KernelAPI) -> Storage:
    """The storage factory: ``factory(kernel)``, from the ``redis`` section.
    Connects lazily: a server that is down fails the first call, not the kernel."""
    from hsu_plugin_redis.storage import RedisStorage

    settings: RedisSettings = kernel.settings(SECTION)
    common: StorageSettings = kernel.settings("storage")
    settings.password()  # a bad password_file is an error now, naming the file
    return RedisStorage(settings, max_value_bytes=common.max_value_bytes)


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, RedisSettings)


@hsu.hookimpl
def hsu_register_storages(register: Register[Callable[[KernelAPI], Storage]]) -> None:
    register("redis", create_storage)
