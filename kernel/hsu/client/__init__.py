"""Routed calls from any Python process: name an interface, never an instance.

:func:`connect` gives a grpc.aio channel for generated stubs; :func:`connect_sync`
the same for blocking stubs and threads. Both balance each call over the
unit's instances, start one on demand and fail idempotent calls over.

The names are imported on first use: a caller of :mod:`hsu.client.credentials`
(the CLI) does not load the routing machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hsu.client.aio import RoutedChannel, connect
    from hsu.client.lease import AsyncLease, SyncLease, lease, lease_sync
    from hsu.client.sync import SyncRoutedChannel, connect_sync
    from hsu.tls import TLSConfig

_LAZY = {
    "RoutedChannel": "hsu.client.aio",
    "connect": "hsu.client.aio",
    "AsyncLease": "hsu.client.lease",
    "SyncLease": "hsu.client.lease",
    "lease": "hsu.client.lease",
    "lease_sync": "hsu.client.lease",
    "SyncRoutedChannel": "hsu.client.sync",
    "connect_sync": "hsu.client.sync",
    "TLSConfig": "hsu.tls",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hsu.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AsyncLease",
    "RoutedChannel",
    "SyncLease",
    "SyncRoutedChannel",
    "TLSConfig",
    "connect",
    "connect_sync",
    "lease",
    "lease_sync",
]
