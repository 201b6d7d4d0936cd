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

from collections.abc import Sequence
from typing import Any

import grpc
from aetcd import rpc

from hsu_plugin_etcd.endpoints import target

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
