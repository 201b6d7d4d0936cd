"""An etcd cluster's endpoints as one gRPC target: no aetcd, no grpc, so the
settings can be checked in a kernel that never talks to etcd."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence


def target(endpoints: Sequence[str], where: str = "endpoints") -> str:
    """One gRPC target naming every member.

    Several members must be IP addresses (``ipv4:a:p,b:p``); one may be a
    host name (``dns:``), which may resolve to each member. ``where`` names
    the setting in errors ("": the kernel names it, as for a settings field).
    """
    if not endpoints:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}no etcd endpoint given (host:port, e.g. 127.0.0.1:2379)")
    families = set()
    for i, ep in enumerate(endpoints):
        host, sep, port = ep.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise ValueError(
                f"{where}[{i}]: {ep!r} is not host:port" if where else f"{ep!r} is not host:port"
            )
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            if len(endpoints) > 1:
                raise ValueError(
                    f"{where + f'[{i}]: ' if where else ''}{ep!r}: several endpoints must be IP"
                    " addresses;"
                    " for host names give one name that resolves to every member"
                ) from None
            return f"dns:///{ep}"
    if len(families) > 1:
        raise ValueError(f"{where}: mixes IPv4 and IPv6 addresses; use one family")
    scheme = "ipv6" if families == {6} else "ipv4"
    return f"{scheme}:{','.join(endpoints)}"
