"""The ``tcp`` probe: healthy iff a TCP connection is accepted."""

from __future__ import annotations

import asyncio

import attrs

from hsu.ports import ProbeResult, ProbeTarget
from hsu_plugins.probes._common import DEFAULT_HOST, close, connect_error, host_port, timed_out

#: a TCP port: 1 to 65535 (tcp and http)
PORT = attrs.validators.optional([attrs.validators.ge(1), attrs.validators.le(65535)])


@attrs.frozen
class TcpOptions:
    #: the port; none: the port of the instance's address, when it is host:port
    port: int | None = attrs.field(default=None, validator=PORT)
    #: none: 127.0.0.1 with ``port``, else the host of the instance's address
    host: str | None = None


class TcpProbe:
    """Healthy iff a TCP connection is accepted; it is closed at once."""

    options = TcpOptions

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        options: TcpOptions = target.options
        if options.port is not None:
            host, port = options.host or DEFAULT_HOST, options.port
        else:
            parsed = host_port(target.address)
            if parsed is None:
                why = f"address {target.address!r} is not host:port" if target.address else ""
                return ProbeResult(
                    False, f"tcp: no port: set health.options.port{f' ({why})' if why else ''}"
                )
            host, port = options.host or parsed[0], parsed[1]
        where = f"tcp {host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
                await close(writer)
        except TimeoutError:
            return ProbeResult(False, f"{where}: {timed_out(timeout)}")
        except OSError as exc:
            return ProbeResult(False, f"{where}: {connect_error(exc)}")
        return ProbeResult(True, f"{where}: connected")
