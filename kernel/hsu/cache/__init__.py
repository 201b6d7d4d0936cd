"""Caches (docs/cache.md): the pieces every cache and every caller of one uses.

- :class:`MemoryCache`: LRU bounded in bytes, with TTLs, in this process
  (the built-in ``memory`` layer, and ``hsu.connect``'s own reply cache);
- :class:`Layers`: caches stacked in order, a miss in one filled from the
  next, a failing one skipped and counted;
- :class:`CacheSettings`: the deployment's ``cache`` section;
- :func:`reply_key`: the key of a routed call's reply (``routing.cache``);
- :class:`CacheClient`: ``hsu.cache.v1.Cache`` on the kernel's control plane
  (an HSU's is ``worker.cache``).

The port itself is :class:`hsu.ports.Cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hsu.cache._keys import REPLY_PREFIX, CacheSettings, check_cache_key, reply_key
from hsu.cache._layers import Layers
from hsu.cache._memory import MemoryCache

if TYPE_CHECKING:
    from hsu.cache._client import CacheClient

__all__ = [
    "REPLY_PREFIX",
    "CacheClient",
    "CacheSettings",
    "Layers",
    "MemoryCache",
    "check_cache_key",
    "reply_key",
]


def __getattr__(name: str) -> Any:
    if name == "CacheClient":  # gRPC's generated code only when it is used
        from hsu.cache._client import CacheClient

        return CacheClient
    raise AttributeError(f"module 'hsu.cache' has no attribute {name!r}")
