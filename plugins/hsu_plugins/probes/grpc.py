"""The ``grpc`` probe: ``grpc.health.v1.Health/Check``, healthy iff SERVING.

Also what the gRPC probes (``grpc``, ``ping``) share: one channel per address
(a channel is expensive to set up), closed by :meth:`forget` once no instance
uses that address any more.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import attrs
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsu.ports import ProbeResult, ProbeTarget
from hsu_plugins.probes._common import timed_out

# Probe channels talk to local HSUs: no proxy, and a short reconnect backoff so
# a server that comes back is seen at the next probe rather than minutes later.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@attrs.frozen
class GrpcOptions:
    #: the service to ask about; "" asks about the whole server
    service: str = ""
    #: ask this address instead of the instance's ("": the instance's)
    address: str = ""


class ChannelCache:
    """One ``grpc.aio`` channel per address, shared by the instances probed there.

    A channel belongs to the event loop that made it; one found from another
    loop (a test's earlier loop, say) is dropped and replaced.
    """

    def __init__(self) -> None:
        self._channels: dict[str, tuple[Any, asyncio.AbstractEventLoop]] = {}
        self._users: dict[str, set[str]] = collections.defaultdict(set)
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, address: str, instance_id: str) -> Any:
        loop = asyncio.get_running_loop()
        self._users[address].add(instance_id)
        cached = self._channels.get(address)
        if cached is not None and cached[1] is loop:
            return cached[0]
        if cached is not None:
            self._close(*cached)
        channel = grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
        self._channels[address] = (channel, loop)
        return channel

    def addresses(self) -> list[str]:
        return sorted(self._channels)

    def forget(self, instance_id: str) -> None:
        """Close every channel only ``instance_id`` used."""
        for address in list(self._users):
            users = self._users[address]
            users.discard(instance_id)
            if users:
                continue
            del self._users[address]
            cached = self._channels.pop(address, None)
            if cached is not None:
                self._close(*cached)

    async def aclose(self) -> None:
        """Close every channel and wait for the closes still under way."""
        for channel, loop in self._channels.values():
            self._close(channel, loop)
        self._channels.clear()
        self._users.clear()
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _close(self, channel: Any, loop: asyncio.AbstractEventLoop) -> None:
        if loop.is_closed():
            return  # its loop is gone, and the channel's resources with it
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif loop.is_running():  # in another thread
            asyncio.run_coroutine_threadsafe(channel.close(), loop)
        elif running is None:
            loop.run_until_complete(channel.close())
        # else its loop is stopped and another runs here: it cannot run the close


def _rpc_failure(where: str, exc: Any, timeout: float, service: str) -> ProbeResult:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProbeResult(False, f"{where}: {timed_out(timeout)}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ProbeResult(False, f"{where}: does not serve {service}")
    details = exc.details() or ""
    return ProbeResult(False, f"{where}: {code.name.lower()}{f': {details}' if details else ''}")


class ChannelProbe:
    """What the grpc and ping probes share: the address, the channels, the errors.

    A subclass sets ``name``, ``service``, ``options`` (a class with an
    ``address`` field) and :meth:`call`.
    """

    name = ""
    #: the gRPC service the probe calls, for "does not serve ..."
    service = ""
    options: type[Any]

    def __init__(self) -> None:
        self.channels = ChannelCache()

    def forget(self, target: ProbeTarget) -> None:
        self.channels.forget(target.instance_id)

    async def aclose(self) -> None:
        """Close every cached channel (the kernel is stopping)."""
        await self.channels.aclose()

    def where(self, address: str, target: ProbeTarget) -> str:
        return f"{self.name} {address}"

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        address = target.options.address or target.address
        if not address:
            return ProbeResult(False, "no address yet (not registered)")
        where = self.where(address, target)
        channel = self.channels.get(address, target.instance_id)
        try:
            async with asyncio.timeout(timeout):
                return await self.call(channel, where, target, timeout)
        except TimeoutError:
            return ProbeResult(False, f"{where}: {timed_out(timeout)}")
        except grpc.aio.AioRpcError as exc:
            return _rpc_failure(where, exc, timeout, self.service)

    async def call(
        self, channel: Any, where: str, target: ProbeTarget, seconds: float
    ) -> ProbeResult:
        raise NotImplementedError


class GrpcHealthProbe(ChannelProbe):
    """``grpc.health.v1.Health/Check``: healthy iff SERVING."""

    name = "grpc"
    service = "grpc.health.v1.Health"
    options = GrpcOptions

    def where(self, address: str, target: ProbeTarget) -> str:
        service = target.options.service
        return f"grpc {address}{f' (service {service!r})' if service else ''}"

    async def call(
        self, channel: Any, where: str, target: ProbeTarget, seconds: float
    ) -> ProbeResult:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=target.options.service)
        try:
            reply = await stub.Check(request, timeout=seconds)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return ProbeResult(False, f"{where}: unknown service")
            raise
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ProbeResult(
            reply.status == health_pb2.HealthCheckResponse.SERVING, f"{where}: {status}"
        )
