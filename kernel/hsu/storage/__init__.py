"""For storage plugins (:class:`hsu.ports.Storage`): the checks every
storage applies to what it is given, and :class:`WatchHub`, the in-process
fan-out of changes to watchers that every storage in this repository uses.

A third party's storage uses the same pieces, so every storage refuses the
same keys and values with the same messages (docs/storage.md). The generated
code of the ``hsu.storage.v1.Storage`` service is :mod:`hsu.storage.v1`;
:class:`StorageClient` calls it (an HSU's is ``worker.storage``).
"""

from hsu.storage._client import StorageClient
from hsu.storage._kit import (
    MAX_TTL,
    WatchHub,
    check_key,
    check_namespace,
    check_ttl,
    check_value,
    key_range,
)

__all__ = [
    "MAX_TTL",
    "StorageClient",
    "WatchHub",
    "check_key",
    "check_namespace",
    "check_ttl",
    "check_value",
    "key_range",
]
