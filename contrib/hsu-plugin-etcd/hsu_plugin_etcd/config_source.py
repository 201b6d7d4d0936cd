"""The ``etcd`` config source: a deployment, or an overlay on a file, kept in
etcd under a prefix.

Where: ``HSU_ETCD_ENDPOINTS`` (``host:port,...``) and ``HSU_ETCD_CONFIG`` (the
prefix, e.g. ``/hsu/v1/config/prod``) in the kernel's environment: the source
is read before the deployment (and its ``etcd`` section) exists. Without
``HSU_ETCD_CONFIG`` it adds nothing.

Every key under the prefix is one YAML or JSON document, applied in key order
over the files (priority 15: above the files' 10, below the environment's 20
and ``--set``'s 30). A change under the prefix is a reload: the kernel applies
the difference, and its reload event names the etcd revision it read
(``version``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from loguru import logger

from hsu.config import read_document
from hsu.errors import ConfigError
from hsu.ports import Layer, SourceContext

# aetcd (and the client module built on it) are imported only once a config
# prefix is set: the source is registered in every kernel that has this
# distribution installed, most of which never read etcd (docs/benchmarks.md,
# Footprint)

ENDPOINTS_ENV = "HSU_ETCD_ENDPOINTS"
PREFIX_ENV = "HSU_ETCD_CONFIG"
#: seconds a read of the config may take
TIMEOUT = 5.0
#: documents under the prefix, at most
MAX_KEYS = 64


class EtcdConfigSource:
    priority = 15
    reads = ("env",)

    def __init__(self) -> None:
        #: what the last load read: "etcd revision N" (the reload event names it)
        self.version: str | None = None
        self.revision = 0

    def _where(self, ctx: SourceContext) -> tuple[list[str], str] | None:
        prefix = ctx.env.get(PREFIX_ENV, "")
        if not prefix:
            return None
        if not prefix.startswith("/"):
            raise ConfigError([f"env {PREFIX_ENV}: {prefix!r} is not a key prefix like /hsu/x"])
        from hsu_plugin_etcd.endpoints import target

        endpoints = [e for e in ctx.env.get(ENDPOINTS_ENV, "127.0.0.1:2379").split(",") if e]
        try:
            target(endpoints, f"env {ENDPOINTS_ENV}")
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
        return endpoints, prefix.rstrip("/") + "/"

    def load(self, ctx: SourceContext) -> list[Layer]:
        where = self._where(ctx)
        if where is None:
            return []
        from aetcd import rpc

        from hsu_plugin_etcd.client import prefix_end, target

        endpoints, prefix = where
        key = prefix.encode()
        with grpc.insecure_channel(target(endpoints)) as channel:
            try:
                resp = rpc.KVStub(channel).Range(
                    rpc.RangeRequest(key=key, range_end=prefix_end(key), limit=MAX_KEYS + 1),
                    timeout=TIMEOUT,
                )
            except grpc.RpcError as exc:
                raise ConfigError(
                    [
                        f"etcd {prefix} at {','.join(endpoints)}: cannot read the config:"
                        f" {exc.code().name} {exc.details()}"
                    ]
                ) from None
        if len(resp.kvs) > MAX_KEYS:
            raise ConfigError([f"etcd {prefix}: more than {MAX_KEYS} documents under the prefix"])
        revision = int(resp.header.revision)
        layers = []
        for kv in resp.kvs:
            name = kv.key.decode(errors="replace")
            try:
                text = kv.value.decode()
            except UnicodeDecodeError:
                raise ConfigError([f"etcd {name}@{kv.mod_revision}: not valid UTF-8"]) from None
            layers.append(read_document(text, f"etcd {name}@{kv.mod_revision}"))
        self.revision = revision
        self.version = f"etcd revision {revision}"
        return layers

    def watch(self, ctx: SourceContext, on_change: Callable[[], None]) -> Awaitable[None] | None:
        where = self._where(ctx)
        if where is None:
            return None
        return self._watch(*where, on_change)

    async def _watch(
        self, endpoints: list[str], prefix: str, on_change: Callable[[], None]
    ) -> None:
        from aetcd import rpc

        from hsu_plugin_etcd.client import Etcd, prefix_end

        etcd = Etcd(endpoints, TIMEOUT)
        key = prefix.encode()
        after = self.revision
        try:
            while True:
                stop = asyncio.Event()
                create = rpc.WatchCreateRequest(
                    key=key, range_end=prefix_end(key), start_revision=after + 1
                )

                async def requests(
                    create: Any = create, stop: asyncio.Event = stop
                ) -> AsyncIterator[Any]:
                    yield rpc.WatchRequest(create_request=create)
                    await stop.wait()

                try:
                    async for resp in etcd.watch.Watch(requests()):
                        if resp.compact_revision:
                            # what changed is unknown: read it all again
                            after = int(resp.header.revision)
                            on_change()
                            break
                        if resp.events:
                            after = max(int(e.kv.mod_revision) for e in resp.events)
                            on_change()
                except grpc.aio.AioRpcError as exc:
                    logger.info("etcd config: watch interrupted ({}); resuming", exc.code().name)
                    await asyncio.sleep(0.2)
                finally:
                    stop.set()
        finally:
            await etcd.close()
