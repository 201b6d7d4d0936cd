"""The etcd v3 API over grpc.aio, on the message classes and stubs that
``aetcd`` ships (docs: README.md, "The etcd client").

aetcd's own ``Client`` dials one ``host:port``, and its watcher ends every
watch when the stream breaks. The registry needs several endpoints with
failover and a watch it resumes from a revision itself, so it keeps aetcd's
generated code (the etcd API, built against current protobuf) and talks to
the stubs directly: one channel over every member, ``round_robin`` over the
ready ones, so a stopped member costs one failed call, not an outage.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import grpc
from aetcd import rpc

#: how often the channel pings an idle connection (etcd refuses pings more
#: often than every 5 s: --grpc-keepalive-min-time)
KEEPALIVE_MS = 5_000


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range of every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


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


class Etcd:
    """Stubs of the etcd services over one channel to every member."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(
            target(endpoints),
            options=[
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", 2_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1_000),
            ],
        )
        self.kv: Any = rpc.KVStub(self.channel)
        self.lease: Any = rpc.LeaseStub(self.channel)
        self.watch: Any = rpc.WatchStub(self.channel)
        self.maintenance: Any = rpc.MaintenanceStub(self.channel)

    async def range_prefix(self, prefix: bytes) -> Any:
        """Every key under ``prefix`` (a linearizable read)."""
        return await self.kv.Range(
            rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)),
            timeout=self.timeout,
            wait_for_ready=True,
        )

    async def get(self, key: bytes) -> Any:
        return await self.kv.Range(
            rpc.RangeRequest(key=key), timeout=self.timeout, wait_for_ready=True
        )

    async def txn(
        self,
        success: Sequence[Any],
        compare: Sequence[Any] = (),
        failure: Sequence[Any] = (),
    ) -> Any:
        return await self.kv.Txn(
            rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure)),
            timeout=self.timeout,
            wait_for_ready=True,
        )

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> Any:
        return await self.kv.Put(
            rpc.PutRequest(key=key, value=value, lease=lease),
            timeout=self.timeout,
            wait_for_ready=True,
        )

    async def delete_prefix(self, prefix: bytes) -> Any:
        return await self.kv.DeleteRange(
            rpc.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix)),
            timeout=self.timeout,
            wait_for_ready=True,
        )

    async def grant(self, ttl: int) -> int:
        resp = await self.lease.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=ttl), timeout=self.timeout, wait_for_ready=True
        )
        if resp.error:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), resp.error
            )
        return int(resp.ID)

    async def revoke(self, lease: int) -> None:
        await self.lease.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout)

    async def compact(self, revision: int) -> None:
        await self.kv.Compact(
            rpc.CompactionRequest(revision=revision, physical=True), timeout=self.timeout
        )

    async def close(self) -> None:
        await self.channel.close()


def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def range_op(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def create_revision_is(key: bytes, revision: int) -> Any:
    """Compare: ``key``'s create revision is ``revision`` (0: the key is absent)."""
    return rpc.Compare(
        key=key,
        result=rpc.Compare.CompareResult.EQUAL,
        target=rpc.Compare.CompareTarget.CREATE,
        create_revision=revision,
    )
