"""The kernels of a cluster, and on-demand starts on another kernel (the
:class:`hsu.ports.Cluster` half of the ``etcd`` registry).

Keys, beside the registry's ``svc/``:

- ``{prefix}/node/{node}``: each kernel, on its lease (it goes when the
  kernel does), its value the units it can start on demand (JSON);
- ``{prefix}/start/{node}/{unit}``: a request that kernel ``node`` start
  an instance of ``unit``, its value the interface a call waits for, on the
  asking kernel's lease (a request of a kernel that died goes with it).
  Each kernel watches its own ``start/{node}/``, takes a request (deletes
  it) and starts the instance as for a call of its own
  (``KernelAPI.instance_for``); the instance is listed once it is ready,
  and the asking kernel's call, waiting for its route, goes there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from aetcd import rpc
from loguru import logger

from hsu.ports import KernelAPI, Node
from hsu_plugin_etcd.client import delete_op, prefix_end

if TYPE_CHECKING:
    from hsu_plugin_etcd.registry import EtcdRegistry


class Nodes:
    def __init__(self, registry: EtcdRegistry, kernel: KernelAPI, units: Sequence[str]) -> None:
        self.registry = registry
        self.kernel = kernel
        self.units = tuple(units)
        root = registry.settings.prefix.rstrip("/")
        self.node_prefix = f"{root}/node/".encode()
        self.start_prefix = f"{root}/start/".encode()
        self.mine = self.start_prefix + f"{registry.node}/".encode()
        self._starting: set[asyncio.Task[None]] = set()
        #: start requests this kernel took (for tests and logs)
        self.taken = 0

    def key(self) -> bytes:
        return self.node_prefix + self.registry.node.encode()

    async def announce(self) -> None:
        """This kernel on the registry's (new) lease."""
        value = json.dumps({"units": list(self.units)}).encode()
        await self.registry.etcd.put(self.key(), value, self.registry.lease)

    async def nodes(self) -> list[Node]:
        resp = await self.registry.etcd.range_prefix(self.node_prefix)
        counts = self.registry.instances_by_node()
        out = []
        for kv in resp.kvs:
            name = kv.key[len(self.node_prefix) :].decode(errors="replace")
            try:
                units = tuple(str(u) for u in json.loads(kv.value).get("units", ()))
            except (ValueError, AttributeError):
                continue
            out.append(Node(name, units, counts.get(name, 0), local=name == self.registry.node))
        return sorted(out, key=lambda n: n.name)

    async def request_start(self, node: str, unit: str, interface: str) -> None:
        key = self.start_prefix + f"{node}/{unit}".encode()
        await self.registry.etcd.put(key, interface.encode(), self.registry.lease)

    # -- requests to this kernel ------------------------------------------------------

    async def follow(self) -> None:
        """List this kernel's start requests, then watch for new ones, for good."""
        while True:
            try:
                resp = await self.registry.etcd.range_prefix(self.mine)
                for kv in resp.kvs:
                    await self._take(kv.key, kv.value)
                await self._watch(int(resp.header.revision) + 1)
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                logger.info("etcd nodes: start requests' watch interrupted ({!r}); again", exc)
                await asyncio.sleep(0.2)

    async def _watch(self, start: int) -> None:
        create = rpc.WatchCreateRequest(
            key=self.mine, range_end=prefix_end(self.mine), start_revision=start
        )
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=create)
            await stop.wait()

        try:
            async for resp in self.registry.etcd.watch.Watch(requests()):
                if resp.compact_revision or resp.canceled:
                    return  # list again
                for ev in resp.events:
                    if ev.type == rpc.Event.EventType.PUT:
                        await self._take(ev.kv.key, ev.kv.value)
        finally:
            stop.set()

    async def _take(self, key: bytes, value: bytes) -> None:
        unit = key[len(self.mine) :].decode(errors="replace")
        interface = value.decode(errors="replace")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.registry.etcd.txn([delete_op(key)])
        if unit not in self.units:
            logger.warning("etcd nodes: asked to start unit {!r}, which this kernel cannot", unit)
            return
        self.taken += 1
        task = asyncio.ensure_future(self._start(unit, interface))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start(self, unit: str, interface: str) -> None:
        log = logger.bind(unit=unit)
        log.info("on demand: another kernel asked for an instance of {}", unit)
        try:
            await self.kernel.instance_for(interface)
        except Exception as exc:
            log.warning("on demand for another kernel: {} failed: {}", unit, exc)

    async def close(self) -> None:
        for t in self._starting:
            t.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
