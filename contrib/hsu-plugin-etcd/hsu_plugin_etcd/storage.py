"""``etcd``: the storage on the etcd cluster (``kernel.storage: etcd``).

The port is etcd-shaped, so this is a thin adapter over the KV, Lease and
Watch APIs (the table in docs/hooks.md, ``hsu_register_storages``):

- a namespace's key ``k`` is the etcd key ``{etcd.prefix}/kv/{namespace}/k``;
- revisions are etcd's (one counter for the whole cluster): a key's
  ``mod_revision``, ``create_revision`` and ``version`` are etcd's own;
- compare-and-set is a ``Txn`` comparing the key's ``mod_revision`` (0: the
  key is absent), a put or delete on success, a read of the key on failure;
- a TTL is a lease of its own (``ceil(ttl)`` seconds, at least etcd's
  minimum), granted just before the put; etcd deletes the key when it runs
  out, and watchers see the delete;
- watch is etcd's ``Watch`` from ``after + 1``; a compacted revision raises
  :class:`hsu.ports.StorageCompacted` with etcd's compact revision.

A call the cluster does not answer in ``etcd.timeout`` seconds raises
:class:`hsu.errors.StorageUnavailable` naming the endpoints; one whose
request may have been applied says so. docs/storage.md, "etcd".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from hsu.errors import InvalidValue, StorageError, StorageUnavailable
from hsu.ports import KeyValue, StorageCompacted, StorageEvent, StorageSettings
from hsu.storage import check_key, check_namespace, check_ttl, check_value, key_range
from hsu_plugin_etcd.client import Etcd
from hsu_plugin_etcd.settings import EtcdSettings

T = TypeVar("T")

#: codes that mean the cluster did not answer (no quorum, no member, too slow)
_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class EtcdStorage:
    """:class:`hsu.ports.Storage` on an etcd cluster."""

    def __init__(
        self,
        settings: EtcdSettings,
        *,
        max_value_bytes: int = StorageSettings().max_value_bytes,
    ) -> None:
        self.settings = settings
        self._max_value = max_value_bytes
        self._where = f"etcd at {','.join(settings.endpoints)}"
        self._base = settings.prefix.encode() + b"/kv/"
        self._etcd: Etcd | None = None
        self._closed = False
        #: lease id -> when it runs out (time.time()), for expires_at
        self._leases: dict[int, float] = {}

    @property
    def max_value_bytes(self) -> int:
        return self._max_value

    @property
    def describe(self) -> str:
        return self._where

    def _client(self) -> Etcd:
        if self._closed:
            raise StorageError(f"{self._where}: the storage is closed")
        if self._etcd is None:
            self._etcd = Etcd(self.settings.endpoints, self.settings.timeout)
        return self._etcd

    def _key(self, ns: str, raw: bytes) -> bytes:
        return self._base + ns.encode() + b"/" + raw

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, write: bool) -> T:
        try:
            return await fn()
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() or exc.code().name
            if exc.code() in _DOWN:
                tail = ""
                if write:
                    tail = (
                        "; the change may or may not have been made: read the key to see"
                        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                        else "; nothing was written"
                    )
                raise StorageUnavailable(
                    f"{self._where} is unavailable: {what}: {exc.code().name}: {detail}{tail}"
                ) from None
            tail = "; nothing was written" if write else ""
            raise StorageError(
                f"{self._where}: {what}: {exc.code().name}: {detail}{tail}"
            ) from None

    async def _expiry(self, lease: int) -> float:
        """When ``lease`` runs out (0: no lease)."""
        if not lease:
            return 0.0
        known = self._leases.get(lease)
        if known is not None:
            return known
        etcd = self._client()
        resp = await self._call(
            "lease time to live",
            lambda: etcd.lease.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease), timeout=etcd.timeout
            ),
            write=False,
        )
        expires = time.time() + max(int(resp.TTL), 0)
        if len(self._leases) > 10000:
            self._leases.clear()
        self._leases[lease] = expires
        return expires

    async def _kv(self, ns: str, kv: Any) -> KeyValue:
        key = bytes(kv.key)[len(self._base) + len(ns) + 1 :]
        return KeyValue(
            key.decode("utf-8", "surrogatepass"),
            bytes(kv.value),
            int(kv.create_revision),
            int(kv.mod_revision),
            int(kv.version),
            await self._expiry(int(kv.lease)),
        )

    # -- reads ------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> KeyValue | None:
        ns, raw = check_namespace(namespace), check_key(key)
        etcd = self._client()
        resp = await self._call(
            f"get {ns}/{key!r:.80}", lambda: etcd.get(self._key(ns, raw)), write=False
        )
        return await self._kv(ns, resp.kvs[0]) if resp.kvs else None

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        ns = check_namespace(namespace)
        start, end = key_range(self._key(ns, check_key(prefix, field="prefix", empty=True)))
        if not isinstance(limit, int) or limit < 0:
            raise InvalidValue(f"limit: must be an integer >= 0, got {limit!r}")
        etcd = self._client()
        resp = await self._call(
            f"list {ns}/{prefix!r:.80}",
            lambda: etcd.kv.Range(
                rpc.RangeRequest(
                    key=start,
                    range_end=end or b"\0",
                    limit=limit,
                    sort_order=rpc.RangeRequest.SortOrder.ASCEND,
                    sort_target=rpc.RangeRequest.SortTarget.KEY,
                ),
                timeout=etcd.timeout,
                wait_for_ready=True,
            ),
            write=False,
        )
        return [await self._kv(ns, kv) for kv in resp.kvs], int(resp.header.revision)

    # -- writes -----------------------------------------------------------------

    async def _lease(self, ttl: float | None) -> tuple[int, float]:
        if not ttl:
            return 0, 0.0
        etcd = self._client()
        resp = await self._call(
            "grant a lease",
            lambda: etcd.lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl))),
                timeout=etcd.timeout,
                wait_for_ready=True,
            ),
            write=True,
        )
        if resp.error:
            raise StorageError(f"{self._where}: grant a lease: {resp.error}; nothing was written")
        expires = time.time() + int(resp.TTL)
        self._leases[int(resp.ID)] = expires
        return int(resp.ID), expires

    @staticmethod
    def _stored(raw: bytes, data: bytes, rev: int, prev: Any, expires: float) -> KeyValue:
        if prev is not None and prev.create_revision:
            create, version = int(prev.create_revision), int(prev.version) + 1
        else:
            create, version = rev, 1
        return KeyValue(raw.decode("utf-8", "surrogatepass"), data, create, rev, version, expires)

    async def put(
        self, namespace: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> KeyValue:
        ns, raw = check_namespace(namespace), check_key(key)
        data, ttl = check_value(value, self._max_value), check_ttl(ttl)
        lease, expires = await self._lease(ttl)
        etcd = self._client()
        resp = await self._call(
            f"put {ns}/{key!r:.80}",
            lambda: etcd.kv.Put(
                rpc.PutRequest(key=self._key(ns, raw), value=data, lease=lease, prev_kv=True),
                timeout=etcd.timeout,
                wait_for_ready=True,
            ),
            write=True,
        )
        prev = resp.prev_kv if resp.HasField("prev_kv") else None
        return self._stored(raw, data, int(resp.header.revision), prev, expires)

    async def delete(self, namespace: str, key: str) -> int:
        ns, raw = check_namespace(namespace), check_key(key)
        etcd = self._client()
        resp = await self._call(
            f"delete {ns}/{key!r:.80}",
            lambda: etcd.kv.DeleteRange(
                rpc.DeleteRangeRequest(key=self._key(ns, raw)),
                timeout=etcd.timeout,
                wait_for_ready=True,
            ),
            write=True,
        )
        return int(resp.header.revision) if resp.deleted else 0

    async def compare_and_set(
        self,
        namespace: str,
        key: str,
        value: bytes | None,
        revision: int,
        *,
        ttl: float | None = None,
    ) -> tuple[bool, KeyValue | None]:
        ns, raw = check_namespace(namespace), check_key(key)
        data = None if value is None else check_value(value, self._max_value)
        ttl = check_ttl(ttl)
        if not isinstance(revision, int) or revision < 0:
            raise InvalidValue(f"revision: must be an integer >= 0, got {revision!r}")
        if data is None and revision == 0:
            return False, await self.get(ns, key)  # nothing to delete
        full = self._key(ns, raw)
        lease, expires = await self._lease(ttl) if data is not None else (0, 0.0)
        if data is None:
            op = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=full))
        else:
            op = rpc.RequestOp(
                request_put=rpc.PutRequest(key=full, value=data, lease=lease, prev_kv=True)
            )
        compare = rpc.Compare(
            key=full,
            result=rpc.Compare.CompareResult.EQUAL,
            target=rpc.Compare.CompareTarget.MOD,
            mod_revision=revision,
        )
        etcd = self._client()
        resp = await self._call(
            f"compare-and-set {ns}/{key!r:.80}",
            lambda: etcd.txn(
                [op], [compare], [rpc.RequestOp(request_range=rpc.RangeRequest(key=full))]
            ),
            write=True,
        )
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            return False, (await self._kv(ns, kvs[0]) if kvs else None)
        if data is None:
            return True, None
        put = resp.responses[0].response_put
        prev = put.prev_kv if put.HasField("prev_kv") else None
        return True, self._stored(raw, data, int(resp.header.revision), prev, expires)

    # -- watch ------------------------------------------------------------------

    async def watch(
        self, namespace: str, prefix: str = "", *, after: int = 0
    ) -> AsyncIterator[StorageEvent]:
        ns = check_namespace(namespace)
        start, end = key_range(self._key(ns, check_key(prefix, field="prefix", empty=True)))
        if not isinstance(after, int) or after < 0:
            raise InvalidValue(f"revision: must be an integer >= 0, got {after!r}")
        etcd = self._client()
        create = rpc.WatchCreateRequest(
            key=start, range_end=end or b"\0", start_revision=after + 1 if after else 0
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=create)
            await stop.wait()

        where = f"watch {ns}/{prefix!r:.80}"
        # not wait_for_ready: with no member reachable the watch fails (UNAVAILABLE)
        # rather than wait for the cluster without end
        call = etcd.watch.Watch(requests())
        try:
            while True:
                try:
                    resp = await call.read()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _DOWN:
                        raise StorageUnavailable(
                            f"{self._where} is unavailable: {where}: {exc.code().name}:"
                            f" {exc.details()}"
                        ) from None
                    raise StorageError(f"{self._where}: {where}: {exc.details()}") from None
                if resp is grpc.aio.EOF:
                    raise StorageUnavailable(f"{self._where}: {where}: the watch stream ended")
                if resp.compact_revision:
                    raise StorageCompacted(
                        f"{self._where}: revision {after} is compacted (the oldest kept is"
                        f" {resp.compact_revision}); list again and watch from its revision",
                        int(resp.compact_revision),
                    )
                if resp.canceled:
                    raise StorageError(f"{self._where}: {where}: cancelled: {resp.cancel_reason}")
                for ev in resp.events:
                    rev = int(ev.kv.mod_revision)
                    if ev.type == rpc.Event.EventType.DELETE:
                        key = bytes(ev.kv.key)[len(self._base) + len(ns) + 1 :]
                        kv = KeyValue(key.decode("utf-8", "surrogatepass"), b"", 0, rev, 0)
                        yield StorageEvent("delete", kv, rev)
                    else:
                        yield StorageEvent("put", await self._kv(ns, ev.kv), rev)
        finally:
            stop.set()
            call.cancel()

    # -- the end ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._etcd is not None:
            await self._etcd.close()
            self._etcd = None
