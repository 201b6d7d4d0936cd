"""The built-in health probes, against real servers and processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import grpc
import psutil
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import hsu
from hsu._kernel.config.model import structure_options
from hsu._kernel.core_service import CoreServicer
from hsu._kernel.logbuffer import LogBuffer
from hsu._kernel.plugins import PluginManager
from hsu.core.v1 import core_pb2_grpc
from hsu.errors import ConfigError, ConflictError
from hsu.ports import Probe, ProbeResult, ProbeTarget
from hsu_plugins import probes

SIX = ["exec", "grpc", "http", "ping", "process", "tcp"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

integration = pytest.mark.integration


def target(
    probe: Probe, addr: str = "", pid: int = 0, instance_id: str = "u-1", **options: object
) -> ProbeTarget:
    """The instance to probe; keyword arguments are its ``health.options``,
    structured for ``probe`` as the kernel does."""
    structured = structure_options(probe, options, ("health", "options"))
    return ProbeTarget(unit="u", instance_id=instance_id, pid=pid, address=addr, options=structured)


# -- servers ----------------------------------------------------------------------


class GrpcServer:
    """A grpc.aio server on a free loopback port, serving health, Core, or both."""

    def __init__(self, *, with_health: bool = True, with_core: bool = False):
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        if with_health:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if with_core:
            core = CoreServicer(lambda: {}, lambda grace, reason: None, LogBuffer())
            core_pb2_grpc.add_CoreServicer_to_server(core, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"

    async def start(self) -> GrpcServer:
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)


class HangingHealth(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        await asyncio.sleep(60)


@pytest.fixture
async def grpc_servers() -> AsyncIterator[Callable[..., Awaitable[GrpcServer]]]:
    started: list[GrpcServer] = []

    async def make(**kwargs: bool) -> GrpcServer:
        server = await GrpcServer(**kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def grpc_probe() -> AsyncIterator[probes.GrpcHealthProbe]:
    probe = probes.GrpcHealthProbe()
    yield probe
    await probe.aclose()


@pytest.fixture
async def ping_probe() -> AsyncIterator[probes.PingProbe]:
    probe = probes.PingProbe()
    yield probe
    await probe.aclose()


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """An asyncio server on a free loopback port; yields the port. Handlers
    still running at the end (one that hangs) are cancelled and awaited."""
    running: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            running.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def free_port() -> int:
    """A loopback port nothing listens on (it was bound, then closed)."""

    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with tcp_server(nothing) as port:
        return port


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """200 for /ok, 302 for /moved, 500 for /fail, garbage for /junk; /hang never answers."""
    request_line = (await reader.readline()).decode()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    path = request_line.split(" ")[1]
    replies = {
        "/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/ok?x=1": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/moved": b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n",
        "/fail": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom",
        "/junk": b"SSH-2.0-OpenSSH\r\n",
    }
    if path == "/hang":
        await asyncio.sleep(60)
    writer.write(replies.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


# -- the plugin ---------------------------------------------------------------------


@integration
async def test_the_builtin_plugin_registers_six_probes_through_its_entry_point():
    pm = PluginManager.load([], env={}, autoload=False)
    assert set(SIX) <= set(pm.probe_names())
    assert [i.distribution for i in pm.infos() if i.name == "probes"] == ["hsu"]
    for name in SIX:
        assert isinstance(pm.probe(name), Probe), name

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    tcp = pm.probe("tcp")
    async with tcp_server(accept) as port:
        result = await tcp.check(target(tcp, port=port), timeout=5)
    assert result == ProbeResult(True, f"tcp 127.0.0.1:{port}: connected")


def test_a_plugin_registers_its_own_probe_and_a_builtin_name_clashes(hsu_plugin_manager):
    class Always:
        options = probes.process.ProcessOptions

        async def check(self, target, timeout):
            return ProbeResult(True, "always")

        def forget(self, target):
            pass

    class Custom:
        @hsu.hookimpl
        def hsu_register_probes(self, register):
            register("always", Always())

    class Clash:
        @hsu.hookimpl
        def hsu_register_probes(self, register):
            register("tcp", Always())

    hsu_plugin_manager.register(Custom(), "custom")
    assert isinstance(hsu_plugin_manager.probe("always"), Always)
    assert "always" in hsu_plugin_manager.probe_names()

    with pytest.raises(ConflictError, match=r"probe 'tcp' is registered by plugin 'probes'"):
        hsu_plugin_manager.register(Clash(), "clash")
    assert not hsu_plugin_manager.pm.has_plugin("clash")
    assert isinstance(hsu_plugin_manager.probe("tcp"), probes.TcpProbe)


# -- grpc -------------------------------------------------------------------------


@integration
async def test_grpc_follows_the_health_status_then_the_server_going_away(grpc_servers, grpc_probe):
    server = await grpc_servers()
    where = f"grpc {server.address}"
    await server.health.set("", SERVING)
    assert await grpc_probe.check(target(grpc_probe, server.address), 5) == ProbeResult(
        True, f"{where}: SERVING"
    )
    await server.health.set("", NOT_SERVING)
    assert await grpc_probe.check(target(grpc_probe, server.address), 5) == ProbeResult(
        False, f"{where}: NOT_SERVING"
    )
    await server.stop()
    result = await grpc_probe.check(target(grpc_probe, server.address), 5)
    assert not result.ok
    assert result.detail.startswith(f"{where}: unavailable")


@integration
async def test_grpc_checks_a_named_service(grpc_servers, grpc_probe):
    server = await grpc_servers()
    await server.health.set("", NOT_SERVING)
    await server.health.set("my.Svc", SERVING)
    ok = await grpc_probe.check(target(grpc_probe, server.address, service="my.Svc"), 5)
    assert ok == ProbeResult(True, f"grpc {server.address} (service 'my.Svc'): SERVING")
    unknown = await grpc_probe.check(target(grpc_probe, server.address, service="no.Such"), 5)
    assert unknown == ProbeResult(
        False, f"grpc {server.address} (service 'no.Such'): unknown service"
    )


@integration
async def test_grpc_without_an_address_is_unhealthy_and_the_option_overrides_it(
    grpc_servers, grpc_probe
):
    assert await grpc_probe.check(target(grpc_probe, ""), 5) == ProbeResult(
        False, "no address yet (not registered)"
    )
    server = await grpc_servers()
    await server.health.set("", SERVING)
    assert (await grpc_probe.check(target(grpc_probe, "", address=server.address), 5)).ok
    assert (await grpc_probe.check(target(grpc_probe, "127.0.0.1:1", address=server.address), 5)).ok


@integration
async def test_grpc_against_a_server_without_health_says_so(grpc_servers, grpc_probe):
    server = await grpc_servers(with_health=False, with_core=True)
    assert await grpc_probe.check(target(grpc_probe, server.address), 5) == ProbeResult(
        False, f"grpc {server.address}: does not serve grpc.health.v1.Health"
    )


@integration
async def test_grpc_returns_at_its_timeout_when_the_server_does_not_answer(grpc_probe):
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HangingHealth(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        result = await grpc_probe.check(target(grpc_probe, address), 0.3)
    finally:
        await server.stop(0)
    assert result == ProbeResult(False, f"grpc {address}: timed out after 0.3s")


@integration
async def test_grpc_keeps_one_channel_per_address_and_forget_closes_it(grpc_servers, grpc_probe):
    server = await grpc_servers()
    await server.health.set("", SERVING)
    first = target(grpc_probe, server.address, instance_id="a")
    second = target(grpc_probe, server.address, instance_id="b")
    for _ in range(3):
        assert (await grpc_probe.check(first, 5)).ok
        assert (await grpc_probe.check(second, 5)).ok
    assert grpc_probe.channels.addresses() == [server.address]
    channel = grpc_probe.channels.get(server.address, "a")

    grpc_probe.forget(first)  # b still probes there: the channel stays
    assert grpc_probe.channels.addresses() == [server.address]
    assert (await grpc_probe.check(second, 5)).ok

    grpc_probe.forget(second)
    assert grpc_probe.channels.addresses() == []
    await grpc_probe.aclose()  # waits for the close forget started
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN

    assert (await grpc_probe.check(second, 5)).ok  # a new channel when probed again
    assert grpc_probe.channels.addresses() == [server.address]


# -- ping -------------------------------------------------------------------------


@integration
async def test_ping_round_trips_core_then_fails_when_the_server_stops(grpc_servers, ping_probe):
    server = await grpc_servers(with_core=True)
    assert await ping_probe.check(target(ping_probe, server.address), 5) == ProbeResult(
        True, f"ping {server.address}: pong"
    )
    assert ping_probe.channels.addresses() == [server.address]
    await server.stop()
    result = await ping_probe.check(target(ping_probe, server.address), 5)
    assert not result.ok
    assert result.detail.startswith(f"ping {server.address}: unavailable")


@integration
async def test_ping_against_a_server_without_core_and_without_an_address(grpc_servers, ping_probe):
    server = await grpc_servers()
    assert await ping_probe.check(target(ping_probe, server.address), 5) == ProbeResult(
        False, f"ping {server.address}: does not serve hsu.core.v1.Core"
    )
    assert await ping_probe.check(target(ping_probe, ""), 5) == ProbeResult(
        False, "no address yet (not registered)"
    )
    ping_probe.forget(target(ping_probe, server.address))
    assert ping_probe.channels.addresses() == []


# -- tcp --------------------------------------------------------------------------


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@integration
async def test_tcp_connects_to_the_port_option_or_the_address():
    probe = probes.TcpProbe()
    async with tcp_server(_accept) as port:
        assert await probe.check(target(probe, port=port), 5) == ProbeResult(
            True, f"tcp 127.0.0.1:{port}: connected"
        )
        assert await probe.check(target(probe, f"127.0.0.1:{port}"), 5) == ProbeResult(
            True, f"tcp 127.0.0.1:{port}: connected"
        )
        assert (await probe.check(target(probe, port=port, host="localhost"), 5)).ok
    assert await probe.check(target(probe, port=port), 5) == ProbeResult(
        False, f"tcp 127.0.0.1:{port}: connection refused"
    )


@integration
async def test_tcp_without_a_port_says_so():
    probe = probes.TcpProbe()
    no_port = await probe.check(target(probe, "unix:/tmp/x.sock"), 5)
    assert no_port == ProbeResult(
        False, "tcp: no port: set health.options.port (address 'unix:/tmp/x.sock' is not host:port)"
    )
    assert await probe.check(target(probe, ""), 5) == ProbeResult(
        False, "tcp: no port: set health.options.port"
    )


# -- http -------------------------------------------------------------------------


@integration
async def test_http_is_healthy_for_2xx_and_3xx_and_not_for_5xx():
    probe = probes.HttpProbe()
    async with tcp_server(http_handler) as port:
        base = f"http://127.0.0.1:{port}"
        assert await probe.check(target(probe, url=f"{base}/ok"), 5) == ProbeResult(
            True, f"http GET {base}/ok: 200 OK"
        )
        assert await probe.check(target(probe, url=f"{base}/ok?x=1"), 5) == ProbeResult(
            True, f"http GET {base}/ok?x=1: 204 No Content"
        )
        assert (await probe.check(target(probe, url=f"{base}/moved"), 5)).ok
        assert await probe.check(target(probe, url=f"{base}/fail"), 5) == ProbeResult(
            False, f"http GET {base}/fail: 500 Internal Server Error"
        )
        assert await probe.check(target(probe, url=f"{base}/nope"), 5) == ProbeResult(
            False, f"http GET {base}/nope: 404 Not Found"
        )
        assert await probe.check(target(probe, port=port, path="/ok"), 5) == ProbeResult(
            True, f"http GET {base}/ok: 200 OK"
        )
        assert await probe.check(target(probe, port=port), 5) == ProbeResult(
            False, f"http GET {base}/: 404 Not Found"
        )


@integration
async def test_http_times_out_on_a_server_that_never_answers():
    probe = probes.HttpProbe()
    async with tcp_server(http_handler) as port:
        result = await probe.check(target(probe, port=port, path="/hang"), 0.3)
    assert result == ProbeResult(
        False, f"http GET http://127.0.0.1:{port}/hang: timed out after 0.3s"
    )


@integration
async def test_http_refused_and_non_http_replies_are_unhealthy():
    probe = probes.HttpProbe()
    async with tcp_server(http_handler) as port:
        junk = await probe.check(target(probe, port=port, path="/junk"), 5)
    assert junk == ProbeResult(
        False,
        f"http GET http://127.0.0.1:{port}/junk: not an HTTP response: b'SSH-2.0-OpenSSH\\r\\n'",
    )
    refused = await probe.check(target(probe, port=await free_port()), 5)
    assert not refused.ok
    assert refused.detail.endswith(": connection refused")


# -- exec -------------------------------------------------------------------------


@integration
async def test_exec_is_healthy_iff_the_command_exits_0():
    probe = probes.ExecProbe()
    assert await probe.check(target(probe, command="true"), 5) == ProbeResult(
        True, "exec true: exit status 0"
    )
    assert await probe.check(target(probe, command=["false"]), 5) == ProbeResult(
        False, "exec false: exit status 1"
    )
    script = "echo first; echo last words >&2; echo; exit 3"
    assert await probe.check(target(probe, command=["sh", "-c", script]), 5) == ProbeResult(
        False, f"exec sh -c '{script}': exit status 3: last words"
    )
    assert await probe.check(target(probe, command="no-such-command-hsu"), 5) == ProbeResult(
        False, "exec no-such-command-hsu: command not found: 'no-such-command-hsu'"
    )


@integration
async def test_exec_passes_the_instance_in_its_environment():
    probe = probes.ExecProbe()
    script = 'echo "$HSU_UNIT $HSU_INSTANCE_ID $HSU_INSTANCE_PID $HSU_INSTANCE_ADDRESS"; exit 1'
    result = await probe.check(
        target(probe, "127.0.0.1:9", pid=42, instance_id="u-7", command=["sh", "-c", script]), 5
    )
    assert not result.ok
    assert result.detail.endswith(": exit status 1: u u-7 42 127.0.0.1:9")


def _gone(pid: int, within: float = 5.0) -> bool:
    """``pid`` is dead (a zombie or reaped) now or within ``within`` seconds: a
    SIGKILL is delivered when the process next runs, which on a loaded machine
    can be after killpg() returned. One that was never signalled (it sleeps
    1000 s) is still there at the end."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


# Sleeps outlast any run: were the command not killed, the check would hang
# until the timeout mark fails the test.
@integration
@pytest.mark.timeout(30)
async def test_exec_timeout_kills_the_whole_group_and_reaps_it(tmp_path: Path):
    probe = probes.ExecProbe()
    assert await probe.check(target(probe, command="sleep 1000"), 0.3) == ProbeResult(
        False, "exec sleep 1000: timed out after 0.3s (killed)"
    )
    pids = tmp_path / "pids"
    script = f"sleep 1000 & echo $! > {pids}; echo $$ >> {pids}; wait"
    result = await probe.check(target(probe, command=["sh", "-c", script]), 1)
    assert not result.ok and result.detail.endswith("timed out after 1s (killed)")
    grandchild, child = (int(p) for p in pids.read_text().split())
    assert not psutil.pid_exists(child)  # reaped, not a zombie
    assert _gone(grandchild)  # killed with its group (the leak check reaps it)


@integration
@pytest.mark.timeout(30)
async def test_a_cancelled_exec_check_kills_and_reaps_its_command(tmp_path: Path):
    probe = probes.ExecProbe()
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(
        probe.check(
            target(probe, command=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 1000"]), 60
        )
    )
    while not pidfile.exists() or not pidfile.read_text().strip():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    pid = int(pidfile.read_text())
    assert psutil.pid_exists(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not psutil.pid_exists(pid)


# -- process ----------------------------------------------------------------------


@integration
async def test_process_is_healthy_while_the_pid_runs():
    probe = probes.ProcessProbe()
    proc = await asyncio.create_subprocess_exec("sleep", "10")
    try:
        result = await probe.check(target(probe, pid=proc.pid), 5)
        assert result.ok and result.detail.startswith(f"process {proc.pid}: ")
    finally:
        proc.kill()
        await proc.wait()
    assert await probe.check(target(probe, pid=proc.pid), 5) == ProbeResult(
        False, f"process {proc.pid}: does not exist"
    )


@integration
async def test_process_is_unhealthy_for_a_zombie_and_an_unknown_pid():
    probe = probes.ProcessProbe()
    # not asyncio's subprocess: its child watcher would reap it, and a zombie is wanted
    proc = subprocess.Popen(["true"])  # noqa: ASYNC220
    try:
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert await probe.check(target(probe, pid=proc.pid), 5) == ProbeResult(
            False, f"process {proc.pid}: is a zombie (exited, not reaped)"
        )
    finally:
        proc.wait()
    assert await probe.check(target(probe, pid=0), 5) == ProbeResult(
        False, "process: no pid (the process is not known)"
    )


# -- options ----------------------------------------------------------------------

PROBLEMS = [
    ("grpc", {}, []),
    ("grpc", {"service": "a.B", "address": "127.0.0.1:1"}, []),
    ("grpc", {"service": 3}, ["service: expected a string, got 3"]),
    ("grpc", {"servce": "x"}, ["servce: unknown key; did you mean 'service'?"]),
    ("ping", {}, []),
    ("ping", {"service": "x"}, ["service: unknown key"]),
    ("tcp", {"port": 80, "host": "localhost"}, []),
    ("tcp", {"port": "x"}, ["port: expected int, got 'x'"]),
    ("tcp", {"port": "80"}, ["port: expected int, got '80'"]),
    ("tcp", {"port": True}, ["port: expected int, got True"]),
    ("tcp", {"port": 70000}, ["port: must be <= 65535, got 70000"]),
    ("tcp", {"port": 0}, ["port: must be >= 1, got 0"]),
    ("tcp", {"frobnicate": 1}, ["frobnicate: unknown key"]),
    ("tcp", {"prot": 1}, ["prot: unknown key; did you mean 'port'?"]),
    ("http", {"url": "http://127.0.0.1:8080/healthz"}, []),
    ("http", {"port": 8080}, []),
    ("http", {"port": 8080, "path": "/ready"}, []),
    ("http", {}, ["url: required (or port, with an optional path)"]),
    ("http", {"path": "/x"}, ["url: required (or port, with an optional path)"]),
    (
        "http",
        {"url": "https://example.com/"},
        ["url: only http:// URLs are supported, got 'https://example.com/'"],
    ),
    ("http", {"url": "http:///x"}, ["url: no host in 'http:///x'"]),
    ("http", {"url": "http://h:99999/"}, ["url: bad port in 'http://h:99999/'"]),
    (
        "http",
        {"url": "http://h/", "port": 80},
        ["port: give either url, or port and path, not both"],
    ),
    (
        "http",
        {"url": "http://h/", "path": "/x"},
        ["path: give either url, or port and path, not both"],
    ),
    (
        "http",
        {"port": 80, "path": "ready"},
        ["path: must be a path starting with '/', got 'ready'"],
    ),
    ("http", {"url": 8080}, ["url: expected a string, got 8080"]),
    ("exec", {"command": "check --fast"}, []),
    ("exec", {"command": ["check", "--fast"]}, []),
    ("exec", {}, ["command: required key missing"]),
    ("exec", {"command": ""}, ["command: must not be empty"]),
    ("exec", {"command": []}, ["command: must not be empty"]),
    (
        "exec",
        {"command": ["a", 1]},
        ["command: expected a string or a list of strings, got ['a', 1]"],
    ),
    ("exec", {"command": "echo 'x"}, ['command: cannot split "echo \'x": No closing quotation']),
    (
        "exec",
        {"comand": "true", "command": "true"},
        ["comand: unknown key; did you mean 'command'?"],
    ),
    ("process", {}, []),
    ("process", {"pid": 1}, ["pid: unknown key (takes no options)"]),
]


@pytest.mark.parametrize(("name", "options", "problems"), PROBLEMS)
def test_options_are_structured_or_each_problem_named(hsu_plugin_manager, name, options, problems):
    probe = hsu_plugin_manager.probe(name)
    path = ("units", "api", "health", "options")
    if not problems:
        structured = structure_options(probe, options, path, "d.yaml")
        assert isinstance(structured, probe.options)
        for key, value in options.items():
            assert getattr(structured, key) == (tuple(value) if isinstance(value, list) else value)
        return
    with pytest.raises(ConfigError) as info:
        structure_options(probe, options, path, "d.yaml")
    assert info.value.problems == [f"d.yaml: units.api.health.options.{p}" for p in problems]


@pytest.mark.parametrize("name", SIX)
def test_options_that_are_not_a_mapping_are_refused(hsu_plugin_manager, name):
    with pytest.raises(ConfigError) as info:
        structure_options(hsu_plugin_manager.probe(name), ["port"], ("health", "options"))
    assert info.value.problems == ["<options>: health.options: expected a mapping, got ['port']"]


def test_every_probe_declares_a_frozen_attrs_options_class(hsu_plugin_manager):
    for name in SIX:
        cls = hsu_plugin_manager.probe(name).options
        assert attrs.has(cls) and cls.__setattr__ is not object.__setattr__, name
