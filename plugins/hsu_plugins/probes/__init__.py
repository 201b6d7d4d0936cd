"""Built-in health probes: grpc, ping, tcp, http, exec, process.

A unit picks one with ``health: {probe: NAME, options: {...}}``. Every probe
returns within the timeout it is given and reports an unhealthy instance as
``ProbeResult(False, why)``, never by raising. ``docs/probes.md`` describes
each probe and its options.

The gRPC probes keep one channel per address (a channel is expensive to set
up); :meth:`forget` closes it once no instance uses that address any more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shlex
import signal
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hsu
from hsu._kernel.options import QUOTE_CHARS, OptionType, check_option_types, quote
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.ports import Probe, ProbeResult, ProbeTarget

DEFAULT_HOST = "127.0.0.1"
#: how much of an exec probe's output is kept, for the last line in the detail
EXEC_TAIL_BYTES = 4096
#: the longest output line or server reply quoted in a detail
PING_PAYLOAD = b"hsu-probe"

# Probe channels talk to local HSUs: no proxy, and a short reconnect backoff so
# a server that comes back is seen at the next probe rather than minutes later.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


# -- options -----------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_command(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


INT: OptionType = (_is_int, "an int")
STR: OptionType = (_is_str, "a string")
COMMAND: OptionType = (_is_command, "a string or a list of strings")


def _check_port(options: Mapping[str, Any]) -> list[str]:
    port = options.get("port")
    if isinstance(port, int) and not isinstance(port, bool) and not 0 < port < 65536:
        return [f"port: expected 1-65535, got {port}"]
    return []


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` (also ``[v6]:port``, ``ipv4:``/``dns:`` forms) or None."""
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
            break
    if not address or address.startswith("unix"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def bad_options(probe: Probe, name: str, target: ProbeTarget) -> ProbeResult | None:
    """Options ``check_options`` would refuse, as a result (a check never raises)."""
    problems = probe.check_options(target.options)
    if not problems:
        return None
    return ProbeResult(False, f"{name}: bad options: {'; '.join(problems)}")


def _timed_out(timeout: float) -> str:
    return f"timed out after {timeout:g}s"


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    last = lines[-1]
    return last if len(last) <= QUOTE_CHARS else last[: QUOTE_CHARS - 3] + "..."


# -- gRPC channels -------------------------------------------------------------


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
        return ProbeResult(False, f"{where}: {_timed_out(timeout)}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ProbeResult(False, f"{where}: does not serve {service}")
    details = exc.details() or ""
    return ProbeResult(False, f"{where}: {code.name.lower()}{f': {details}' if details else ''}")


class _GrpcProbe:
    """What the grpc and ping probes share: options, the address, the channels."""

    name = ""
    #: the gRPC service the probe calls, for "does not serve ..."
    service = ""
    options: Mapping[str, OptionType] = {"address": STR}

    def __init__(self) -> None:
        self.channels = ChannelCache()

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        return check_option_types(options, self.options, f"{self.name} probe")

    def forget(self, target: ProbeTarget) -> None:
        self.channels.forget(target.instance_id)

    async def aclose(self) -> None:
        """Close every cached channel (the kernel is stopping)."""
        await self.channels.aclose()

    def where(self, address: str, target: ProbeTarget) -> str:
        return f"{self.name} {address}"

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if bad := bad_options(self, self.name, target):
            return bad
        address = str(target.options.get("address") or target.address)
        if not address:
            return ProbeResult(False, "no address yet (not registered)")
        where = self.where(address, target)
        channel = self.channels.get(address, target.instance_id)
        try:
            async with asyncio.timeout(timeout):
                return await self.call(channel, where, target, timeout)
        except TimeoutError:
            return ProbeResult(False, f"{where}: {_timed_out(timeout)}")
        except grpc.aio.AioRpcError as exc:
            return _rpc_failure(where, exc, timeout, self.service)

    async def call(
        self, channel: Any, where: str, target: ProbeTarget, seconds: float
    ) -> ProbeResult:
        raise NotImplementedError


class GrpcHealthProbe(_GrpcProbe):
    """``grpc.health.v1.Health/Check``: healthy iff SERVING."""

    name = "grpc"
    service = "grpc.health.v1.Health"
    options = {"address": STR, "service": STR}

    def where(self, address: str, target: ProbeTarget) -> str:
        service = str(target.options.get("service", ""))
        return f"grpc {address}{f' (service {service!r})' if service else ''}"

    async def call(
        self, channel: Any, where: str, target: ProbeTarget, seconds: float
    ) -> ProbeResult:
        service = str(target.options.get("service", ""))
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=seconds
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return ProbeResult(False, f"{where}: unknown service")
            raise
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ProbeResult(
            reply.status == health_pb2.HealthCheckResponse.SERVING, f"{where}: {status}"
        )


class PingProbe(_GrpcProbe):
    """``hsu.core.v1.Core/Ping``: healthy iff the payload comes back."""

    name = "ping"
    service = "hsu.core.v1.Core"

    async def call(
        self, channel: Any, where: str, target: ProbeTarget, seconds: float
    ) -> ProbeResult:
        stub = core_pb2_grpc.CoreStub(channel)
        reply = await stub.Ping(core_pb2.PingRequest(payload=PING_PAYLOAD), timeout=seconds)
        if reply.payload != PING_PAYLOAD:
            return ProbeResult(False, f"{where}: the reply's payload differs from the request's")
        return ProbeResult(True, f"{where}: pong")


# -- tcp and http --------------------------------------------------------------


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__


class TcpProbe:
    """Healthy iff a TCP connection is accepted; it is closed at once."""

    options: Mapping[str, OptionType] = {"host": STR, "port": INT}

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        problems = check_option_types(options, self.options, "tcp probe")
        return problems or _check_port(options)

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if bad := bad_options(self, "tcp", target):
            return bad
        options = target.options
        if "port" in options:
            host, port = str(options.get("host", DEFAULT_HOST)), int(options["port"])
        else:
            parsed = _host_port(target.address)
            if parsed is None:
                why = f"address {target.address!r} is not host:port" if target.address else ""
                return ProbeResult(
                    False, f"tcp: no port: set health.options.port{f' ({why})' if why else ''}"
                )
            host, port = str(options.get("host", parsed[0])), parsed[1]
        where = f"tcp {host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
                await _close(writer)
        except TimeoutError:
            return ProbeResult(False, f"{where}: {_timed_out(timeout)}")
        except OSError as exc:
            return ProbeResult(False, f"{where}: {_connect_error(exc)}")
        return ProbeResult(True, f"{where}: connected")


class HttpProbe:
    """``GET`` over HTTP/1.1 with ``Connection: close``: healthy iff 200-399."""

    options: Mapping[str, OptionType] = {"url": STR, "port": INT, "path": STR}

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        problems = check_option_types(options, self.options, "http probe")
        if problems:
            return problems
        problems = _check_port(options)
        if "url" in options:
            for key in ("port", "path"):
                if key in options:
                    problems.append(f"{key}: give either url, or port and path, not both")
            url = urllib.parse.urlsplit(options["url"])
            if url.scheme != "http":
                problems.append(f"url: only http:// URLs are supported, got {options['url']!r}")
            elif not url.hostname:
                problems.append(f"url: no host in {options['url']!r}")
            else:
                try:
                    url.port  # noqa: B018 - raises for a bad port
                except ValueError:
                    problems.append(f"url: bad port in {options['url']!r}")
        elif "port" not in options:
            problems.append("url: required (or port, with an optional path)")
        if "path" in options and not str(options["path"]).startswith("/"):
            problems.append(f"path: expected a path starting with '/', got {options['path']!r}")
        return problems

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if bad := bad_options(self, "http", target):
            return bad
        options = target.options
        if "url" in options:
            url = str(options["url"])
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname or "", parts.port or 80
            path = parts.path or "/"
            if parts.query:
                path = f"{path}?{parts.query}"
        else:
            host, port = DEFAULT_HOST, int(options["port"])
            path = str(options.get("path", "/"))
            url = f"http://{host}:{port}{path}"
        where = f"http GET {url}"
        try:
            async with asyncio.timeout(timeout):
                status, reason = await self._get(host, port, path)
        except TimeoutError:
            return ProbeResult(False, f"{where}: {_timed_out(timeout)}")
        except OSError as exc:
            return ProbeResult(False, f"{where}: {_connect_error(exc)}")
        except ValueError as exc:
            return ProbeResult(False, f"{where}: {exc}")
        detail = f"{where}: {status} {reason}".rstrip()
        return ProbeResult(200 <= status < 400, detail)

    @staticmethod
    async def _get(host: str, port: int, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            name = f"[{host}]" if ":" in host else host
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {name}:{port}\r\nUser-Agent: hsu-probe\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("latin-1"))
            await writer.drain()
            line = await reader.readline()
        except BaseException:
            writer.transport.abort()
            raise
        await _close(writer)
        if not line:
            raise ValueError("the connection closed before a response")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {quote(line[:QUOTE_CHARS])}")
        return int(parts[1]), parts[2] if len(parts) > 2 else ""


# -- exec and process ----------------------------------------------------------


class ExecProbe:
    """Run a command in its own process group: healthy iff it exits 0.

    On timeout (or cancellation) the whole group is killed and the command is
    reaped before :meth:`check` returns.
    """

    options: Mapping[str, OptionType] = {"command": COMMAND}

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        problems = check_option_types(options, self.options, "exec probe")
        if problems:
            return problems
        if "command" not in options:
            return ["command: required"]
        try:
            argv = self.argv(options["command"])
        except ValueError as exc:
            return [f"command: cannot split {options['command']!r}: {exc}"]
        return [] if argv else ["command: must not be empty"]

    @staticmethod
    def argv(command: str | Sequence[str]) -> list[str]:
        return shlex.split(command) if isinstance(command, str) else list(command)

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if bad := bad_options(self, "exec", target):
            return bad
        argv = self.argv(target.options["command"])
        command = shlex.join(argv)
        if len(command) > QUOTE_CHARS:
            command = command[: QUOTE_CHARS - 3] + "..."
        where = f"exec {command}"
        env = dict(os.environ)
        env.update(
            HSU_UNIT=target.unit,
            HSU_INSTANCE_ID=target.instance_id,
            HSU_INSTANCE_PID=str(target.pid),
            HSU_INSTANCE_ADDRESS=target.address,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError:
            return ProbeResult(False, f"{where}: command not found: {argv[0]!r}")
        except OSError as exc:
            return ProbeResult(False, f"{where}: cannot start: {exc}")
        finished = False
        try:
            async with asyncio.timeout(timeout):
                output = await _tail(proc.stdout)
                code = await proc.wait()
            finished = True
        except TimeoutError:
            return ProbeResult(False, f"{where}: {_timed_out(timeout)} (killed)")
        finally:
            if not finished:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.shield(proc.wait())
            # A process that left the group may still hold the pipe open; the
            # transport is closed here rather than when that process ends.
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
        last = _last_line(output)
        if code == 0:
            return ProbeResult(True, f"{where}: exit status 0")
        status = f"exit status {code}" if code >= 0 else f"killed by {_signal_name(-code)}"
        return ProbeResult(False, f"{where}: {status}{f': {last}' if last else ''}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


async def _tail(stream: asyncio.StreamReader | None) -> bytes:
    """Read ``stream`` to its end, keeping only the last :data:`EXEC_TAIL_BYTES`."""
    if stream is None:
        return b""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-EXEC_TAIL_BYTES:]
    return kept


class ProcessProbe:
    """Healthy iff the instance's pid exists and is not a zombie."""

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        return check_option_types(options, {}, "process probe")

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if bad := bad_options(self, "process", target):
            return bad
        if target.pid <= 0:
            return ProbeResult(False, "process: no pid (the process is not known)")
        where = f"process {target.pid}"
        try:
            status = psutil.Process(target.pid).status()
        except psutil.NoSuchProcess:
            return ProbeResult(False, f"{where}: does not exist")
        except psutil.AccessDenied:
            return ProbeResult(True, f"{where}: exists (status not readable)")
        if status == psutil.STATUS_ZOMBIE:
            return ProbeResult(False, f"{where}: is a zombie (exited, not reaped)")
        return ProbeResult(True, f"{where}: {status}")


@hsu.hookimpl
def hsu_register_probes(register: Callable[[str, Probe], None]) -> None:
    register("grpc", GrpcHealthProbe())
    register("ping", PingProbe())
    register("tcp", TcpProbe())
    register("http", HttpProbe())
    register("exec", ExecProbe())
    register("process", ProcessProbe())
