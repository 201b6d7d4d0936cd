"""The ``memory`` cache layer (the default): :class:`hsu.cache.MemoryCache`
in the kernel's process, LRU bounded in bytes, with TTLs (docs/cache.md).

Settings, section ``memory_cache``::

    memory_cache:
      max_bytes: 67108864        # keys, values and ~96 bytes each; LRU beyond
      max_entry_bytes: 1048576   # a larger value is not kept
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

import hsu
from hsu.cache import MemoryCache
from hsu.ports import Cache, KernelAPI, Register

#: the settings section's name (this plugin's entry point name)
SECTION = "memory_cache"


@attrs.frozen
class MemoryCacheSettings:
    max_bytes: int = attrs.field(default=64 * 2**20, validator=attrs.validators.ge(4096))
    max_entry_bytes: int = attrs.field(default=2**20, validator=attrs.validators.ge(1))


def create(kernel: KernelAPI) -> Cache:
    s: MemoryCacheSettings = kernel.settings(SECTION)
    return MemoryCache(s.max_bytes, min(s.max_entry_bytes, s.max_bytes))


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, MemoryCacheSettings)


@hsu.hookimpl
def hsu_register_caches(register: Register[Callable[[KernelAPI], Cache]]) -> None:
    register("memory", create, default=True)
