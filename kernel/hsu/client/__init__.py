"""Routed calls from any Python process: name an interface, never an instance.

:func:`connect` gives a grpc.aio channel for generated stubs; :func:`connect_sync`
the same for blocking stubs and threads. Both balance each call over the
unit's instances, start one on demand and fail idempotent calls over.
"""

from __future__ import annotations

from hsu.client.aio import RoutedChannel, connect
from hsu.client.lease import AsyncLease, SyncLease, lease, lease_sync
from hsu.client.sync import SyncRoutedChannel, connect_sync
from hsu.tls import TLSConfig

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
