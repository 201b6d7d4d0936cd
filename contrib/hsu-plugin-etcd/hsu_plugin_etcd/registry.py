"""The ``etcd`` registry: the :class:`hsu.ports.Registry` port on an etcd cluster.

Keys: ``{prefix}/svc/{interface}/{node}/{instance}``, one per interface an
instance serves, its endpoint as JSON; every key this kernel writes is
attached to its one lease, kept alive by one stream, so a kernel that dies
takes its entries with it within ``ttl``.

Every kernel lists the prefix, then watches from the listing's revision + 1
and keeps a local copy: ``lookup``, ``snapshot`` and ``watch`` answer from
it, so a pick never waits on etcd. What breaks such registries, and what
this one does:

* the watch hits a compacted revision: list again (the difference to the
  local copy becomes events) and watch from that listing's revision + 1;
* the watch stream breaks (a member stops): watch again from the last
  revision seen + 1 (another member answers);
* keepalive is lost (the lease expired while etcd was out of reach): grant a
  new lease and put this kernel's keys again (they are the same keys, so no
  duplicates), then revoke the old lease if it still exists (nothing stale);
* a write fails: the endpoint is kept and written again on the next
  keepalive answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from aetcd import rpc
from loguru import logger

from hsu import validate
from hsu.errors import HsuError, InvalidValue
from hsu.ports import Endpoint, KernelAPI, Node, RegistryCompacted, RegistryEvent
from hsu_plugin_etcd.client import Etcd, delete_op, prefix_end, put_op
from hsu_plugin_etcd.nodes import Nodes
from hsu_plugin_etcd.settings import EtcdSettings

#: events the local copy keeps for watchers that resume
HISTORY = 10_000
#: events one local watcher may fall behind before it must list again
WATCH_QUEUE = 1_000
PUT, DELETE = "put", "delete"


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted revisions up to {revision}")
        self.revision = revision


def encode(ep: Endpoint) -> bytes:
    return json.dumps(
        {
            "instance_id": ep.instance_id,
            "unit": ep.unit,
            "address": ep.address,
            "interfaces": list(ep.interfaces),
            "state": ep.state,
            "weight": ep.weight,
            "metadata": dict(ep.metadata),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def decode(key: bytes, value: bytes) -> Endpoint:
    """The endpoint a key holds, checked like any value from outside."""
    try:
        raw = json.loads(value)
        ep = Endpoint(
            instance_id=validate.instance_id(raw["instance_id"]),
            unit=validate.unit_name(raw["unit"]),
            address=validate.address(raw["address"]),
            interfaces=tuple(
                validate.interface_name(i, field=f"interfaces[{n}]")
                for n, i in enumerate(raw["interfaces"])
            ),
            state=str(raw["state"]),
            weight=validate.weight(int(raw["weight"])),
            metadata=validate.labels(dict(raw["metadata"])),
        )
    except (ValueError, KeyError, TypeError, InvalidValue) as exc:
        raise InvalidValue(f"etcd key {key.decode(errors='replace')!r}: {exc}") from None
    return ep


class EtcdRegistry:
    """A :class:`hsu.ports.Registry` shared by every kernel on one etcd cluster."""

    def __init__(
        self,
        settings: EtcdSettings,
        node: str,
        kernel: KernelAPI | None = None,
        units: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.node = node
        self.etcd = Etcd(settings.endpoints, settings.timeout)
        self.prefix = (settings.prefix.rstrip("/") + "/svc/").encode()
        #: this kernel's endpoints, as it last put them
        self._own: dict[str, Endpoint] = {}
        self._dirty: set[str] = set()
        self.lease = 0
        self._lease_ok: asyncio.Event = asyncio.Event()
        self._write = asyncio.Lock()
        #: the local copy: key -> endpoint; instance -> its keys; instance -> endpoint
        self._kv: dict[bytes, Endpoint] = {}
        self._keys: dict[str, set[bytes]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._revision = 0
        self._history: collections.deque[RegistryEvent] = collections.deque(maxlen=HISTORY)
        #: events at or below this revision are no longer all in the history
        self._floor = 0
        self._watchers: set[_LocalWatch] = set()
        self._listed = asyncio.Event()
        self._closed = False
        #: how many times the lease was replaced, the watch re-listed (for tests)
        self.leases_granted = 0
        self.relists = 0
        self._tasks = [
            asyncio.ensure_future(self._keep()),
            asyncio.ensure_future(self._sync()),
        ]
        #: the kernels and on-demand starts on them (``hsu.ports.Cluster``),
        #: with a kernel to start instances in
        self.cluster: Nodes | None = None
        if kernel is not None:
            self.cluster = Nodes(self, kernel, units)
            self._tasks.append(asyncio.ensure_future(self.cluster.follow()))

    # -- keys ---------------------------------------------------------------------

    def key(self, interface: str, instance_id: str) -> bytes:
        return self.prefix + f"{interface}/{self.node}/{instance_id}".encode()

    def _split(self, key: bytes) -> tuple[str, str, str] | None:
        parts = key[len(self.prefix) :].decode(errors="replace").split("/")
        return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None

    # -- Registry -------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The etcd revision the local copy is as of."""
        return self._revision

    async def put(self, endpoint: Endpoint, ttl: float | None = None) -> None:
        """Write the endpoint under the kernel's lease (``ttl`` is the lease's:
        an entry lives while its kernel keeps the lease alive)."""
        self._check_open()
        async with self._write:
            old = self._own.get(endpoint.instance_id)
            self._own[endpoint.instance_id] = endpoint
            await self._lease_ok.wait()
            try:
                await self._put(endpoint, old)
            except grpc.aio.AioRpcError as exc:
                self._dirty.add(endpoint.instance_id)
                raise HsuError(
                    f"etcd registry put {endpoint.instance_id}: {exc.code().name}"
                    f" {exc.details()}; written again once etcd answers"
                ) from None
            self._dirty.discard(endpoint.instance_id)

    async def _put(self, ep: Endpoint, old: Endpoint | None) -> None:
        value = encode(ep)
        ops = [put_op(self.key(i, ep.instance_id), value, self.lease) for i in ep.interfaces]
        if old is not None:
            ops += [
                delete_op(self.key(i, ep.instance_id))
                for i in old.interfaces
                if i not in ep.interfaces
            ]
        await self.etcd.txn(ops)

    async def keepalive(self, instance_id: str) -> bool:
        """Whether the entry is listed: its life is the kernel's lease's."""
        return instance_id in self._endpoints or instance_id in self._own

    async def delete(self, instance_id: str) -> bool:
        self._check_open()
        async with self._write:
            own = self._own.pop(instance_id, None)
            self._dirty.discard(instance_id)
            keys = set(self._keys.get(instance_id, ()))
            if own is not None:
                keys |= {self.key(i, instance_id) for i in own.interfaces}
            if not keys:
                return False
            await self.etcd.txn([delete_op(k) for k in sorted(keys)])
            return True

    async def lookup(self, interface: str) -> list[Endpoint]:
        await self._listed.wait()
        return [
            self._endpoints[i] for i in sorted(self._endpoints)
            if interface in self._endpoints[i].interfaces
        ]  # fmt: skip

    async def snapshot(self) -> tuple[list[Endpoint], int]:
        await self._listed.wait()
        return [self._endpoints[i] for i in sorted(self._endpoints)], self._revision

    def watch(self, after: int) -> AsyncIterator[RegistryEvent]:
        return _LocalWatch(self, after)

    # -- Cluster (hsu.ports.Cluster; hsu_plugin_etcd.nodes) -------------------------

    async def nodes(self) -> list[Node]:
        if self.cluster is None:
            raise HsuError("this etcd registry was made without a kernel: it knows no nodes")
        return await self.cluster.nodes()

    async def request_start(self, node: str, unit: str, interface: str) -> None:
        if self.cluster is None:
            raise HsuError("this etcd registry was made without a kernel: it starts nothing")
        await self._lease_ok.wait()
        await self.cluster.request_start(node, unit, interface)

    async def announce(self) -> None:
        """This kernel's node entry again (its units changed), on the lease."""
        if self.cluster is not None:
            async with self._write:
                await self._lease_ok.wait()
                await self.cluster.announce()

    def instances_by_node(self) -> dict[str, int]:
        """How many instances the local copy lists for each node."""
        seen: dict[str, set[str]] = {}
        for key in self._kv:
            parts = self._split(key)
            if parts is not None:
                seen.setdefault(parts[1], set()).add(parts[2])
        return {node: len(instances) for node, instances in seen.items()}

    async def close(self) -> None:
        """Stop following etcd; revoke the lease (this kernel's entries go at once)."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.close()
        if self.lease:
            try:
                await self.etcd.revoke(self.lease)
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "etcd registry: revoking lease {:x} failed ({}); its entries"
                    " expire within {} s",
                    self.lease,
                    exc.code().name,
                    self.settings.ttl,
                )
        for w in list(self._watchers):
            w._end()
        await self.etcd.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the etcd registry is closed")

    # -- the lease ------------------------------------------------------------------

    async def _keep(self) -> None:
        """Hold one lease: grant, put what is ours, keep alive; on loss, again."""
        ttl = self.settings.ttl
        deadline = 0.0
        while True:
            try:
                if not self._lease_ok.is_set():
                    await self._new_lease()
                    deadline = time.monotonic() + ttl
                async for resp in self.etcd.lease.LeaseKeepAlive(self._pings(self.lease)):
                    if resp.TTL <= 0:
                        raise LookupError(f"lease {self.lease:x} expired")
                    deadline = time.monotonic() + resp.TTL
                    if self._dirty:
                        await self._rewrite()
                raise ConnectionError("keepalive stream ended")
            except asyncio.CancelledError:
                raise
            except LookupError as exc:
                logger.warning("etcd registry: {}; granting a new one", exc)
                self._lease_ok.clear()
            except (grpc.aio.AioRpcError, ConnectionError, HsuError) as exc:
                what = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                if self._lease_ok.is_set() and time.monotonic() >= deadline:
                    logger.warning("etcd registry: lease {:x} lapsed ({})", self.lease, what)
                    self._lease_ok.clear()
                else:
                    logger.info("etcd registry: keepalive interrupted ({}); again", what)
                await asyncio.sleep(min(1.0, ttl / 10))

    async def _pings(self, lease: int) -> AsyncIterator[Any]:
        every = max(self.settings.ttl / 3, 0.2)
        while True:
            yield rpc.LeaseKeepAliveRequest(ID=lease)
            await asyncio.sleep(every)

    async def _new_lease(self) -> None:
        async with self._write:
            old = self.lease
            lease = await self.etcd.grant(self.settings.ttl)
            self.lease = lease
            self.leases_granted += 1
            for inst in list(self._own):
                await self._put(self._own[inst], None)
            self._dirty.clear()
            if self.cluster is not None:
                await self.cluster.announce()
            self._lease_ok.set()
            logger.info("etcd registry: node {} holds lease {:x}", self.node, lease)
        if old:
            # its keys are on the new lease now: revoking it removes nothing of
            # ours, and frees it at once if it had not expired
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.etcd.revoke(old)

    async def _rewrite(self) -> None:
        async with self._write:
            for inst in sorted(self._dirty):
                ep = self._own.get(inst)
                if ep is not None:
                    await self._put(ep, None)
            self._dirty.clear()

    # -- the local copy -------------------------------------------------------------

    async def _sync(self, after: int | None = None) -> None:
        """List, then watch from the listing's revision + 1, for good (or
        resume from ``after`` + 1)."""
        while True:
            try:
                if after is None:
                    after = await self._relist()
                await self._follow(after + 1)
            except asyncio.CancelledError:
                raise
            except _Compacted as exc:
                logger.warning("etcd registry: {}; listing again", exc)
                after = None
            except grpc.aio.AioRpcError as exc:
                logger.info("etcd registry: watch interrupted ({}); resuming", exc.code().name)
                after = self._revision if self._listed.is_set() else None
                await asyncio.sleep(0.1)

    async def _relist(self) -> int:
        resp = await self.etcd.range_prefix(self.prefix)
        revision = int(resp.header.revision)
        seen: dict[bytes, Endpoint] = {}
        for kv in resp.kvs:
            ep = self._decode(kv.key, kv.value)
            if ep is not None:
                seen[kv.key] = ep
        for key in [k for k in self._kv if k not in seen]:
            self._apply_delete(key, revision)
        for key, ep in seen.items():
            self._apply_put(key, ep, revision)
        self._revision = max(self._revision, revision)
        if self._listed.is_set():
            self.relists += 1
        self._listed.set()
        return revision

    async def _follow(self, start: int) -> None:
        create = rpc.WatchCreateRequest(
            key=self.prefix,
            range_end=prefix_end(self.prefix),
            start_revision=start,
            progress_notify=True,
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=create)
            await stop.wait()

        try:
            async for resp in self.etcd.watch.Watch(requests()):
                if resp.compact_revision:
                    raise _Compacted(int(resp.compact_revision))
                if resp.canceled:
                    raise ConnectionError(f"etcd cancelled the watch: {resp.cancel_reason}")
                if resp.events:
                    for ev in resp.events:
                        rev = int(ev.kv.mod_revision)
                        if ev.type == rpc.Event.EventType.DELETE:
                            self._apply_delete(ev.kv.key, rev)
                        else:
                            ep = self._decode(ev.kv.key, ev.kv.value)
                            if ep is not None:
                                self._apply_put(ev.kv.key, ep, rev)
                        self._revision = max(self._revision, rev)
                elif not resp.created:
                    # progress: every event up to the header's revision was sent
                    self._revision = max(self._revision, int(resp.header.revision))
        finally:
            stop.set()

    def _decode(self, key: bytes, value: bytes) -> Endpoint | None:
        parts = self._split(key)
        try:
            ep = decode(key, value)
            if parts is None or parts[0] not in ep.interfaces or parts[2] != ep.instance_id:
                raise InvalidValue(
                    f"etcd key {key.decode(errors='replace')!r}: does not match its endpoint"
                )
        except InvalidValue as exc:
            logger.warning("etcd registry: ignored: {}", exc)
            return None
        return ep

    def _apply_put(self, key: bytes, ep: Endpoint, revision: int) -> None:
        old_key_ep = self._kv.get(key)
        self._kv[key] = ep
        if old_key_ep is not None and old_key_ep.instance_id != ep.instance_id:
            self._drop_key(key, old_key_ep.instance_id, revision)
        self._keys.setdefault(ep.instance_id, set()).add(key)
        if self._endpoints.get(ep.instance_id) != ep:
            self._endpoints[ep.instance_id] = ep
            self._emit(PUT, ep, revision)

    def _apply_delete(self, key: bytes, revision: int) -> None:
        ep = self._kv.pop(key, None)
        if ep is not None:
            self._drop_key(key, ep.instance_id, revision)

    def _drop_key(self, key: bytes, instance_id: str, revision: int) -> None:
        keys = self._keys.get(instance_id)
        if keys is None:
            return
        keys.discard(key)
        if not keys:
            del self._keys[instance_id]
            ep = self._endpoints.pop(instance_id, None)
            if ep is not None:
                self._emit(DELETE, ep, revision)

    def _emit(self, kind: str, ep: Endpoint, revision: int) -> None:
        event = RegistryEvent(kind, ep, revision)
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0].revision
        self._history.append(event)
        for w in list(self._watchers):
            w._deliver(event)

    def _replay(self, after: int) -> Iterable[RegistryEvent]:
        if after < self._floor:
            raise RegistryCompacted(
                f"revision {after} is older than the etcd registry's local history"
                f" (kept above {self._floor}); take a fresh snapshot"
            )
        return [e for e in self._history if e.revision > after]


class _LocalWatch(AsyncIterator[RegistryEvent]):
    """One watcher of the local copy: replayed history, then live events."""

    def __init__(self, registry: EtcdRegistry, after: int) -> None:
        self._registry: EtcdRegistry | None = registry
        self._queue: asyncio.Queue[RegistryEvent | None] = asyncio.Queue()
        self._error: RegistryCompacted | None = None
        self._after = after
        try:
            for e in registry._replay(after):
                self._queue.put_nowait(e)
        except RegistryCompacted as exc:
            self._error = exc
            self._registry = None
            return
        if registry._closed:
            self._queue.put_nowait(None)
            return
        registry._watchers.add(self)

    def __aiter__(self) -> _LocalWatch:
        return self

    async def __anext__(self) -> RegistryEvent:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self._finish()
            raise
        if item is None:
            self._finish()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self._finish()

    def _deliver(self, event: RegistryEvent) -> None:
        if event.revision <= self._after:
            return
        if self._queue.qsize() >= WATCH_QUEUE:
            self._error = RegistryCompacted(
                f"the watcher fell more than {WATCH_QUEUE} events behind; take a fresh snapshot"
            )
            self._end()
            return
        self._queue.put_nowait(event)

    def _end(self) -> None:
        if self._registry is not None:
            self._registry._watchers.discard(self)
            self._registry = None
        self._queue.put_nowait(None)

    def _finish(self) -> None:
        if self._registry is not None:
            self._registry._watchers.discard(self)
            self._registry = None
