"""The cache section, and what keys are."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from hsu.config import Seconds
from hsu.errors import InvalidValue
from hsu.ports import MAX_CACHE_KEY_BYTES, RESERVED_NAMESPACE_PREFIX

#: the kernel's keys of routed replies: in the reserved ``hsu.`` space, which
#: no HSU reaches over ``hsu.cache.v1.Cache``, so none can read or poison them
REPLY_PREFIX = RESERVED_NAMESPACE_PREFIX + "reply/"


def _namespaces(instance: object, attribute: object, value: Mapping[str, str]) -> None:
    from hsu.ports import _namespaces as check

    check(instance, attribute, value)


@attrs.frozen
class CacheSettings:
    """The deployment's ``cache`` section (docs/cache.md); the layers are
    chosen by ``kernel.caches``."""

    #: the largest value ``hsu.cache.v1.Cache`` Set accepts (a larger one is
    #: INVALID_ARGUMENT), and the largest reply the gateway keeps
    max_value_bytes: int = attrs.field(
        default=1024 * 1024,
        validator=[attrs.validators.ge(1), attrs.validators.le(64 * 1024 * 1024)],
    )
    #: a unit's namespace when it is not the unit's name (like ``storage.namespaces``)
    namespaces: Mapping[str, str] = attrs.field(factory=dict, validator=_namespaces)
    #: how long an upper layer keeps a value filled from a lower one that has no TTL
    fill_ttl: Seconds = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    #: how long a layer that failed is skipped before it is tried again
    retry_after: Seconds = attrs.field(default=1.0, validator=attrs.validators.ge(0))

    def namespace_of(self, unit: str) -> str:
        return self.namespaces.get(unit, unit)


def check_cache_key(key: str) -> str:
    """A key a caller gave: 1 to :data:`hsu.ports.MAX_CACHE_KEY_BYTES` UTF-8 bytes."""
    n = len(key.encode())
    if not n or n > MAX_CACHE_KEY_BYTES:
        raise InvalidValue(f"key: 1 to {MAX_CACHE_KEY_BYTES} bytes, got {n}")
    return key


def reply_key(
    method: str,
    request: bytes,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    names: Sequence[str],
) -> str:
    """The cache key of a routed call's reply: the method, the request's
    bytes and the values of the metadata keys ``names`` (each value counted,
    so a key sent twice, once, empty or not at all are four keys)."""
    import hashlib  # not at start (docs/benchmarks.md, Footprint)

    h = hashlib.sha256(method.encode())
    md = tuple(metadata or ())
    for name in names:
        h.update(b"\0" + name.encode())
        for k, v in md:
            if k == name:
                b = v if isinstance(v, bytes) else v.encode()
                h.update(len(b).to_bytes(4, "big") + b)
    h.update(b"\0\0")
    h.update(request)
    return REPLY_PREFIX + h.hexdigest()
