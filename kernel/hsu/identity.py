"""The caller's identity as the kernel forwards it to an HSU.

With auth on (docs/auth.md), the kernel's gateway drops every ``hsu-identity``
metadata a caller sent and adds one of its own, carrying the identity it
verified, signed with HMAC-SHA256 keyed by the target instance's secret
(``HSU_INSTANCE_TOKEN``). Only the kernel and that instance know the key, so
a caller cannot forge the header, and a header made for one instance is no
good at another. :func:`hsu.worker.identity` reads it in a handler.

The value is ``<payload>.<mac>``, both unpadded base64url; the payload is
JSON: ``{"n": name, "k": kind, "r": [roles], "a": {attributes},
"i": instance id, "t": unix time}``.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from hsu.ports import Identity

#: the metadata key of the forwarded identity
METADATA = "hsu-identity"
#: where a spawned instance finds its secret (the kernel sets it at spawn)
ENV_TOKEN = "HSU_INSTANCE_TOKEN"
#: the metadata an instance proves itself with to its kernel (Register,
#: Deregister, ReportLoad), and the kernel to it (Core.Shutdown)
TOKEN_METADATA = "hsu-instance-token"
#: a forwarded identity older than this many seconds is not accepted
MAX_AGE = 300.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: str) -> str:
    import hashlib  # not at start (docs/benchmarks.md, Footprint)
    import hmac  # not at start (docs/benchmarks.md, Footprint)

    return _b64(hmac.new(key.encode(), payload.encode("ascii"), hashlib.sha256).digest())


def sign(identity: Identity, key: str, instance_id: str, *, now: float | None = None) -> str:
    """The ``hsu-identity`` value for ``instance_id``, signed with its secret ``key``."""
    body = {
        "n": identity.name,
        "k": identity.kind,
        "r": list(identity.roles),
        "a": dict(identity.attributes),
        "i": instance_id,
        "t": int(time.time() if now is None else now),
    }
    payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_mac(key, payload)}"


def verify(
    value: str | bytes, key: str, instance_id: str | None = None, *, max_age: float = MAX_AGE
) -> Identity | None:
    """The identity ``value`` carries if ``key`` signed it (for ``instance_id``,
    when given, within ``max_age`` seconds); ``None`` for anything else."""
    import hmac  # not at start (docs/benchmarks.md, Footprint)

    if not key:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    payload, _, mac = value.partition(".")
    if not payload or not mac or not hmac.compare_digest(mac, _mac(key, payload)):
        return None
    try:
        body: Any = json.loads(_unb64(payload))
        name, kind, roles = str(body["n"]), str(body["k"]), tuple(str(r) for r in body["r"])
        attributes = {str(k): str(v) for k, v in dict(body["a"]).items()}
        signed_for, at = str(body["i"]), float(body["t"])
    except (ValueError, KeyError, TypeError):
        return None
    if instance_id is not None and signed_for != instance_id:
        return None
    if abs(time.time() - at) > max_age:
        return None
    return Identity(name=name, kind=kind, roles=roles, attributes=attributes)
