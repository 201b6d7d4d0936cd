"""The ``ping`` probe: ``hsu.core.v1.Core/Ping``, healthy iff the payload comes back.

Every HSU serves Core, so this needs nothing from an HSU beyond the SDK.
"""

from __future__ import annotations

from typing import Any

import attrs

from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.ports import ProbeResult, ProbeTarget
from hsu_plugins.probes.grpc import ChannelProbe

PING_PAYLOAD = b"hsu-probe"


@attrs.frozen
class PingOptions:
    #: ping this address instead of the instance's ("": the instance's)
    address: str = ""


class PingProbe(ChannelProbe):
    """``hsu.core.v1.Core/Ping``: healthy iff the payload comes back."""

    name = "ping"
    service = "hsu.core.v1.Core"
    options = PingOptions

    async def call(
        self, channel: Any, where: str, target: ProbeTarget, seconds: float
    ) -> ProbeResult:
        stub = core_pb2_grpc.CoreStub(channel)
        reply = await stub.Ping(core_pb2.PingRequest(payload=PING_PAYLOAD), timeout=seconds)
        if reply.payload != PING_PAYLOAD:
            return ProbeResult(False, f"{where}: the reply's payload differs from the request's")
        return ProbeResult(True, f"{where}: pong")
