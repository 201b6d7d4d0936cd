"""Calls to an instance on another host: the cluster key proves the caller.

A kernel with ``kernel.advertise`` off loopback has its instances listen on
an address other hosts reach (docs/multihost.md). Nothing of the kernel's
own auth stands between such an instance and the network, so the kernels
of a cluster share a secret, ``kernel.cluster_key``: the kernel hands it to
the instances it starts (``HSU_CLUSTER_KEY``), and every call to an
instance carries ``hsu-peer: <t>.<mac>``, an HMAC-SHA256 under the key of
the instance's address (the one the registry lists), the full method name
and the time ``t`` (unix seconds). The Python SDK's server
(:mod:`hsu.worker`) refuses a call without a valid one (UNAUTHENTICATED),
so a host that does not hold the key cannot call the instances, and a value
seen on the wire is good only for the same method of the same instance for
:data:`MAX_AGE` seconds. The key itself never crosses the network. The
calls themselves are not encrypted: see docs/multihost.md.

The gateway (every kernel's) and :func:`hsu.connect` (``cluster_key=``, or
``$HSU_CLUSTER_KEY``) sign their calls with :class:`PeerSigner`.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterable
from typing import Any

#: the metadata key of the proof
METADATA = "hsu-peer"
#: where a spawned instance (and a client) finds the cluster key
ENV_KEY = "HSU_CLUSTER_KEY"
#: a proof older (or newer) than this many seconds is refused
MAX_AGE = 60.0
#: the shortest key accepted
MIN_KEY = 16


def _mac(key: bytes, address: str, method: str, t: int) -> str:
    import hashlib  # not at start (docs/benchmarks.md, Footprint)
    import hmac  # not at start (docs/benchmarks.md, Footprint)

    msg = f"{address}\n{method}\n{t}".encode()
    digest = hmac.new(key, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class PeerSigner:
    """Makes ``hsu-peer`` values with the cluster key; one per (address,
    method) is made once a second and reused within it."""

    def __init__(self, key: str):
        if len(key) < MIN_KEY:
            raise ValueError(f"a cluster key has at least {MIN_KEY} characters")
        self._key = key.encode()
        self._made: dict[tuple[str, str], tuple[int, tuple[str, str]]] = {}

    def header(self, address: str, method: str) -> tuple[str, str]:
        """The ``(hsu-peer, value)`` metadata pair for a call of ``method``
        to the instance at ``address``."""
        t = int(time.time())
        hit = self._made.get((address, method))
        if hit is not None and hit[0] == t:
            return hit[1]
        pair = (METADATA, f"{t}.{_mac(self._key, address, method, t)}")
        if len(self._made) > 4096:
            self._made.clear()
        self._made[address, method] = (t, pair)
        return pair

    def add(
        self, metadata: Iterable[tuple[str, Any]] | None, address: str, method: str
    ) -> tuple[tuple[str, Any], ...]:
        """``metadata`` (None, or pairs) with the proof for ``method`` at ``address``."""
        return (*(metadata or ()), self.header(address, method))


def signer(cluster_key: str | None = None) -> PeerSigner | None:
    """The signer for ``cluster_key``, else for ``$HSU_CLUSTER_KEY``; None
    without either."""
    key = cluster_key if cluster_key is not None else os.environ.get(ENV_KEY, "")
    return PeerSigner(key) if key else None


class PeerVerifier:
    """Checks ``hsu-peer`` values for the instance listening at ``address``;
    a value that verified is remembered until it is too old."""

    def __init__(self, key: str):
        self._key = key.encode()
        self.address = ""
        self._good: dict[str, float] = {}

    def verify(self, value: str | bytes, method: str, *, now: float | None = None) -> bool:
        import hmac  # not at start (docs/benchmarks.md, Footprint)

        if isinstance(value, bytes):
            value = value.decode("latin-1")
        now = time.time() if now is None else now
        seen = f"{method}\n{value}"  # a value is bound to one method
        until = self._good.get(seen)
        if until is not None and until > now:
            return True
        stamp, _, mac = value.partition(".")
        if not stamp.isdigit() or not mac or not self.address:
            return False
        t = int(stamp)
        if abs(now - t) > MAX_AGE:
            return False
        if not hmac.compare_digest(mac, _mac(self._key, self.address, method, t)):
            return False
        if len(self._good) > 4096:
            self._good.clear()
        self._good[seen] = t + MAX_AGE
        return True
