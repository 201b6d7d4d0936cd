"""Leadership for ``placement: singleton`` units: one instance in the cluster.

Each kernel holds one leadership lease (``etcd.leader_ttl``) and, every
``loop_wait`` seconds, renews it and campaigns for each singleton unit it
does not lead: a transaction that creates ``{prefix}/leader/{unit}`` on its
lease only if the key does not exist (create revision 0). The winner's
revision (the key's create revision) is the **fencing token** of its term:
the instance gets it as ``HSU_FENCING_TOKEN`` (``hsu_instance_env``), and
anything the instance writes elsewhere can carry it, so a store can refuse a
write from an older term.

A leader stops its instance before its lease can expire: when no renewal has
succeeded for ``leader_ttl - retry_timeout`` seconds it stops leading, and the
stop takes at most ``retry_timeout`` (the unit's ``stop_grace`` plus its
``routing.drain_timeout`` must fit). Each renewal is bounded by
``retry_timeout`` and tried every ``loop_wait``; Patroni's rule
``loop_wait + 2 * retry_timeout <= leader_ttl`` (checked in the settings)
leaves a healthy leader room for one failed renewal before that point. The
key expires with the lease, so another kernel's transaction succeeds only
after that: two kernels never run the unit at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from aetcd import rpc
from loguru import logger

import hsu
from hsu.errors import HsuError
from hsu.ports import KernelAPI
from hsu_plugin_etcd.client import Etcd, create_revision_is, put_op
from hsu_plugin_etcd.settings import EtcdSettings

#: the environment variable that carries the fencing token to the instance
FENCING_ENV = "HSU_FENCING_TOKEN"
#: and the key whose create revision it is
LEADER_KEY_ENV = "HSU_LEADER_KEY"
NAME = "etcd-leadership"
#: how often the watchdog looks at the renewal deadline
WATCHDOG = 0.05


class Leadership:
    """One kernel's campaign for its singleton units (per-kernel plugin state)."""

    def __init__(self, kernel: KernelAPI, settings: EtcdSettings, units: list[str]) -> None:
        self.kernel = kernel
        self.settings = settings
        self.units = units
        self.node = settings.node_name()
        self.prefix = settings.prefix.rstrip("/") + "/leader/"
        self.etcd: Etcd | None = None
        self.lease = 0
        #: unit -> fencing token, while this kernel leads it
        self.terms: dict[str, int] = {}
        #: monotonic time the last successful renewal was sent
        self.renewed_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._changes: set[asyncio.Task[None]] = set()

    def key(self, unit: str) -> bytes:
        return (self.prefix + unit).encode()

    @property
    def deadline(self) -> float:
        """When this kernel must stop leading unless a renewal succeeds first."""
        return self.renewed_at + self.settings.leader_ttl - self.settings.retry_timeout

    # -- hooks -----------------------------------------------------------------------

    @hsu.hookimpl
    def hsu_kernel_started(self, kernel: KernelAPI) -> None:
        self.etcd = Etcd(self.settings.endpoints, self.settings.retry_timeout)
        self._tasks = [
            asyncio.ensure_future(self._campaign()),
            asyncio.ensure_future(self._watchdog()),
        ]

    @hsu.hookimpl
    def hsu_instance_env(self, kernel: KernelAPI, unit: str) -> Mapping[str, str] | None:
        token = self.terms.get(unit)
        if token is None:
            return None
        return {FENCING_ENV: str(token), LEADER_KEY_ENV: self.key(unit).decode()}

    @hsu.hookimpl
    async def hsu_kernel_stopping(self, kernel: KernelAPI) -> None:
        # campaign no more; the kernel stops the instances next
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @hsu.hookimpl
    async def hsu_kernel_stopped(self, kernel: KernelAPI) -> None:
        # the instances are stopped: give up the lead at once (the keys go)
        for t in list(self._changes):
            t.cancel()
        if self.etcd is None:
            return
        if self.lease:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.etcd.revoke(self.lease)
        self.terms.clear()
        await self.etcd.close()

    # -- the campaign ------------------------------------------------------------------

    async def _campaign(self) -> None:
        s = self.settings
        while True:
            began = time.monotonic()
            try:
                await asyncio.wait_for(self._round(), s.retry_timeout)
            except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as exc:
                what = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                logger.warning("etcd leadership: a round failed ({}); again", what)
            await asyncio.sleep(max(0.0, s.loop_wait - (time.monotonic() - began)))

    async def _round(self) -> None:
        assert self.etcd is not None
        sent = time.monotonic()
        if not self.lease or not await self._renew():
            self.lease = await self.etcd.grant(self.settings.leader_ttl)
            logger.info("etcd leadership: node {} holds lease {:x}", self.node, self.lease)
        self.renewed_at = sent
        for unit in self.units:
            if unit in self.terms:
                resp = await self.etcd.get(self.key(unit))
                if not resp.kvs or resp.kvs[0].lease != self.lease:
                    self._demote(unit, "its leader key is gone or not on this kernel's lease")
                continue
            resp = await self.etcd.txn(
                [put_op(self.key(unit), self.node.encode(), self.lease)],
                compare=[create_revision_is(self.key(unit), 0)],
            )
            if resp.succeeded:
                self._lead(unit, int(resp.header.revision))

    async def _renew(self) -> bool:
        """One keepalive; False when the lease is gone (demoted first)."""
        assert self.etcd is not None

        async def one() -> AsyncIterator[Any]:
            yield rpc.LeaseKeepAliveRequest(ID=self.lease)

        async for resp in self.etcd.lease.LeaseKeepAlive(one()):
            if resp.TTL > 0:
                return True
            break
        for unit in list(self.terms):
            self._demote(unit, f"lease {self.lease:x} expired")
        self.lease = 0
        return False

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG)
            if self.terms and time.monotonic() >= self.deadline:
                for unit in list(self.terms):
                    self._demote(
                        unit,
                        f"no renewal for {self.settings.leader_ttl - self.settings.retry_timeout:g}"
                        f" s (leader_ttl - retry_timeout): stopping before the lease can expire",
                    )

    # -- leading ---------------------------------------------------------------------

    def _lead(self, unit: str, token: int) -> None:
        self.terms[unit] = token
        logger.bind(unit=unit).info(
            "etcd leadership: node {} leads {} (fencing token {})", self.node, unit, token
        )
        self._change(unit, 1)

    def _demote(self, unit: str, why: str) -> None:
        token = self.terms.pop(unit, None)
        logger.bind(unit=unit).warning(
            "etcd leadership: node {} stops leading {} (term {}): {}", self.node, unit, token, why
        )
        self._change(unit, 0)

    def _change(self, unit: str, count: int) -> None:
        async def scale() -> None:
            try:
                await self.kernel.scale(unit, count)
            except HsuError as exc:
                logger.bind(unit=unit).warning("etcd leadership: scale to {}: {}", count, exc)

        task = asyncio.ensure_future(scale())
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
