"""A pytest plugin for plugin and HSU authors (entry point ``pytest11: hsu``).

Fixtures:

``hsu_plugin_manager``
    A fresh :class:`hsu.PluginManager` with built-ins only (no autoload).

``hsu_kernel_factory``
    ``await hsu_kernel_factory(deployment_dict, plugins=[obj, ...])`` builds a
    kernel with its data plane on an ephemeral loopback port and its control
    plane on a unix socket in the test's temporary directory, registers the given plugin
    objects, starts it, and stops it (and every instance) after the test.
    Needs pytest-asyncio.

``hsu_free_address``
    A ``unix:`` address in the test's temporary directory.

``hsu_kernel``
    ``await hsu_kernel(deployment_dict)`` starts a kernel as
    ``hsu_kernel_factory`` does and returns a :class:`KernelHarness`: the
    kernel, every event it published, and ``wait_for(...)`` /
    ``wait_ready(...)`` to wait (bounded) for what it does on its own.

``hsu_server``
    ``await hsu_server(servicer, ...)`` serves servicers plus Core,
    grpc.health.v1 and reflection on a loopback port (the Python SDK's
    :class:`hsu.worker.Worker`, standalone) and returns a :class:`TestServer`
    with its ``address`` and a ``channel()``.

``hsu_fake_hsu``
    ``await hsu_fake_hsu("pkg.v1.Service")`` serves a :class:`FakeHsu`: real
    gRPC on loopback, with canned replies and errors per method
    (``fake.reply("Method", msg)``, ``fake.fail("Method", code)``) and the
    calls it received (``fake.calls``).

:func:`require_node` finds node and npm and installs a Node.js package's
dependencies (``npm ci``) once, for tests of HSUs written in Node.js.

docs/testing.md describes them all.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory

from hsu._kernel.config.model import deployment_from_dict
from hsu._kernel.kernel import Kernel
from hsu._kernel.plugins import PluginManager
from hsu.ports import Event, InstanceView
from hsu.worker import Service, Worker

KernelFactory = Callable[..., Awaitable[Kernel]]


@pytest.fixture
def hsu_plugin_manager() -> PluginManager:
    return PluginManager.load(env={}, autoload=False)


@pytest.fixture
def hsu_free_address(tmp_path: Path) -> str:
    return f"unix:{tmp_path / 'kernel.sock'}"


def build_kernel(
    raw: dict[str, Any],
    *,
    plugins: Iterable[object] = (),
    names: Iterable[str] = (),
    address: str = "127.0.0.1:0",
    control: str | None = None,
    base_dir: str = ".",
) -> Kernel:
    """A kernel from a dict, with extra plugin objects registered from code.

    Its data plane listens on ``address`` (an ephemeral loopback port), its
    control plane on ``control`` (default: the unix socket in its state dir,
    ``<base_dir>/.hsu/<name>/control.sock``)."""
    deployment = deployment_from_dict(raw, source="<test>", base_dir=base_dir)
    pm = PluginManager.load([*deployment.plugins, *names], env={}, autoload=False)
    for plugin in plugins:
        pm.register(plugin)
    return Kernel(deployment, pm, address=address, control_address=control)


#: set to 1 and a test that needs node and npm fails instead of skipping
ENV_REQUIRE_NODE = "HSU_REQUIRE_NODE"
#: the longest ``npm ci`` may take
NPM_CI_TIMEOUT = 300.0


@attrs.frozen
class NodePackage:
    """A Node.js package with its dependencies installed."""

    package: str
    node: str
    npm: str


def _missing(what: str) -> None:
    if os.environ.get(ENV_REQUIRE_NODE, "") not in ("", "0"):
        pytest.fail(f"{what} ({ENV_REQUIRE_NODE} is set, so this test may not skip)")
    pytest.skip(what)


def require_node(
    package: str | os.PathLike[str], *, timeout: float = NPM_CI_TIMEOUT
) -> NodePackage:
    """Node and npm, and ``package``'s dependencies installed from its lockfile.

    Skips when node or npm is missing, or fails when ``HSU_REQUIRE_NODE`` is
    set. Runs ``npm ci --prefer-offline`` (bounded by ``timeout`` seconds)
    when ``node_modules`` is missing, under a file lock, so pytest-xdist
    workers install it once. Call it from a session-scoped fixture.
    """
    root = Path(package).resolve()
    if not (root / "package-lock.json").is_file():
        raise FileNotFoundError(f"{root}: no package-lock.json to install from (npm ci needs one)")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _missing("node and npm are needed (apt-get install nodejs npm)")
    assert node is not None and npm is not None
    with (root / ".npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "node_modules").is_dir():
            cmd = [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"]
            try:
                done = subprocess.run(
                    cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired:
                shutil.rmtree(root / "node_modules", ignore_errors=True)
                _missing(f"{root}: npm ci took longer than {timeout:g} s")
            if done.returncode != 0:
                shutil.rmtree(root / "node_modules", ignore_errors=True)
                _missing(f"{root}: npm ci failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return NodePackage(str(root), node, npm)


# -- a kernel and its events ------------------------------------------------


class KernelHarness:
    """A started kernel, with every event it published since it was made.

    ``wait_for`` and ``wait_ready`` wait (bounded) for what the kernel does on
    its own: an instance started, a restart after a crash, a reload applied.
    """

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        #: every event, oldest first (kernel, instance, unit, reload)
        self.events: list[Event] = []
        kernel.events.listeners.append(self.events.append)

    @property
    def address(self) -> str:
        """The data plane (the gateway): any gRPC client calls units' interfaces here."""
        return self.kernel.address

    @property
    def control_address(self) -> str:
        """The control plane: the Kernel API, ``hsu.connect``."""
        return self.kernel.control_address

    def connect(self, **kwargs: Any) -> Any:
        """``hsu.connect`` to this kernel: a routed channel for generated stubs."""
        from hsu.client import connect

        return connect(self.control_address, **kwargs)

    def matching(
        self,
        *,
        kind: str | None = None,
        unit: str | None = None,
        instance_id: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
        topic: str | None = None,
        after: int = 0,
    ) -> list[Event]:
        """The events seen so far that match every given field (``reason``: a
        substring), with ``seq`` greater than ``after``."""
        wanted = {
            "kind": kind,
            "topic": topic,
            "unit": unit,
            "instance_id": instance_id,
            "from_state": from_state,
            "to_state": to_state,
        }
        return [
            e
            for e in self.events
            if e.seq > after
            and all(v is None or getattr(e, k) == v for k, v in wanted.items())
            and (reason is None or reason in e.reason)
        ]

    async def wait_for(self, *, timeout: float = 30.0, count: int = 1, **match: Any) -> Event:
        """The ``count``-th event matching ``match`` (see :meth:`matching`),
        once it happened (an instance's becoming ready is two events, topics
        ``instance.ready`` and ``worker.started``: match ``topic`` to count
        one of them); ``AssertionError`` naming what was seen after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(**match)
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() >= deadline:
                seen = "; ".join(
                    f"{e.seq} {e.kind} {e.unit} {e.from_state}->{e.to_state} {e.reason}".strip()
                    for e in self.events[-10:]
                )
                raise AssertionError(
                    f"no{' ' + str(count) if count > 1 else ''} event matching {match}"
                    f" within {timeout:g} s; last seen: {seen or 'none'}"
                )
            await asyncio.sleep(0.02)

    async def wait_ready(
        self, unit: str, count: int = 1, *, timeout: float = 30.0
    ) -> list[InstanceView]:
        """``count`` instances of ``unit`` ready (started if the unit is
        on-demand and none runs), within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [
                i
                for i in self.kernel.instances.values()
                if i.unit == unit and i.state.value == "ready"
            ]
            if len(ready) >= count:
                return list(ready)
            if time.monotonic() >= deadline:
                states = [
                    f"{i.instance_id}={i.state.value}" for i in self.kernel.instances.values()
                ]
                raise AssertionError(
                    f"unit {unit!r}: {len(ready)} of {count} instances ready within"
                    f" {timeout:g} s ({', '.join(states) or 'no instances'})"
                )
            if not any(i.unit == unit for i in self.kernel.instances.values()):
                await self.kernel.start_instance(unit)
            await asyncio.sleep(0.02)


# -- an HSU in the test's process -------------------------------------------


class TestServer:
    """Servicers served as an HSU is (Core, health, reflection), standalone on loopback."""

    __test__ = False  # not a test class, for pytest's collector

    def __init__(self, worker: Worker):
        self.worker = worker
        self._channels: list[grpc.aio.Channel] = []

    @property
    def address(self) -> str:
        return self.worker.address

    def channel(self) -> grpc.aio.Channel:
        """A channel to it (closed when the test ends)."""
        channel = grpc.aio.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    async def start(self) -> str:
        return await self.worker.start()

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.worker.stop()


def serve_standalone(*servicers: Any, grace: float = 0.5, **options: Any) -> TestServer:
    """A :class:`TestServer` for ``servicers`` (started with ``await s.start()``)."""
    options.setdefault("listen", "127.0.0.1:0")
    worker = Worker(*servicers, grace=grace, **options)
    worker.kernel_address = ""  # standalone, whatever the environment says
    worker.token = ""
    return TestServer(worker)


@attrs.frozen
class Fail:
    """A canned error: the call ends with ``code`` and ``details``."""

    code: grpc.StatusCode
    details: str = ""


@attrs.frozen
class Call:
    """One call a :class:`FakeHsu` received."""

    method: str
    #: the request, or for a client stream the list of requests
    request: Any
    metadata: tuple[tuple[str, str | bytes], ...]


class FakeHsu:
    """A stand-in for an HSU: real gRPC, canned answers.

    ``services`` are full service names whose generated ``_pb2`` module is
    imported (their descriptors are looked up in protobuf's default pool).
    Each method has a queue of answers, used in order, the last one for every
    call after it: a message (or for a server stream a list of them), a
    :class:`Fail`, or a callable of the request (a list of them for a client
    stream) returning either, or an awaitable of either. A method with no
    answer fails with UNIMPLEMENTED.
    """

    def __init__(self, *services: str):
        if not services:
            raise ValueError("FakeHsu: name at least one service, e.g. 'hsu.echo.v1.Echo'")
        pool = descriptor_pool.Default()
        self.services: dict[str, Any] = {}
        for name in services:
            try:
                self.services[name] = pool.FindServiceByName(name)
            except KeyError:
                raise ValueError(
                    f"FakeHsu: service {name!r} is unknown: import its generated _pb2 module first"
                ) from None
        self.answers: dict[str, list[Any]] = {}
        #: every call received, in order
        self.calls: list[Call] = []
        #: set once served (``hsu_fake_hsu``, or :func:`serve_standalone` of
        #: :meth:`services_for_worker`)
        self.server: TestServer | None = None
        self.address = ""

    def _method(self, method: str) -> str:
        """``/pkg.Service/Method`` from ``Method`` or ``pkg.Service/Method``."""
        if "/" not in method:
            owners = [s for s in self.services.values() if method in s.methods_by_name]
            if len(owners) != 1:
                raise ValueError(
                    f"FakeHsu: method {method!r} is in {len(owners)} of the services;"
                    " name it as 'pkg.Service/Method'"
                )
            return f"/{owners[0].full_name}/{method}"
        service, _, name = method.strip("/").rpartition("/")
        if service not in self.services or name not in self.services[service].methods_by_name:
            raise ValueError(f"FakeHsu: no method {method!r} in {', '.join(self.services)}")
        return f"/{service}/{name}"

    def reply(self, method: str, *answers: Any) -> FakeHsu:
        """Queue answers for ``method`` (see the class); returns the fake."""
        self.answers.setdefault(self._method(method), []).extend(answers)
        return self

    def fail(self, method: str, code: grpc.StatusCode, details: str = "") -> FakeHsu:
        """Queue an error for ``method``; returns the fake."""
        return self.reply(method, Fail(code, details))

    def calls_to(self, method: str) -> list[Call]:
        full = self._method(method)
        return [c for c in self.calls if c.method == full]

    async def _answer(self, method: str, request: Any, context: Any) -> Any:
        self.calls.append(Call(method, request, tuple(context.invocation_metadata() or ())))
        queue = self.answers.get(method) or []
        if not queue:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"FakeHsu: no canned answer for {method}"
            )
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(answer) and not isinstance(answer, Fail):
            answer = answer(request)
            if inspect.isawaitable(answer):
                answer = await answer
        if isinstance(answer, Fail):
            await context.abort(answer.code, answer.details)
        return answer

    def _handler(self, service: Any) -> grpc.GenericRpcHandler:
        handlers = {}
        for m in service.methods:
            full = f"/{service.full_name}/{m.name}"
            codec = {
                "request_deserializer": message_factory.GetMessageClass(m.input_type).FromString,
                "response_serializer": message_factory.GetMessageClass(
                    m.output_type
                ).SerializeToString,
            }
            make = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[(m.client_streaming, m.server_streaming)]
            behavior = self._behavior(full, m.client_streaming, m.server_streaming)
            handlers[m.name] = make(behavior, **codec)
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _behavior(self, method: str, client_stream: bool, server_stream: bool) -> Any:
        async def request_of(request: Any) -> Any:
            return [r async for r in request] if client_stream else request

        if server_stream:

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                for reply in await self._answer(method, await request_of(request), context):
                    yield reply

            return streaming

        async def unary(request: Any, context: Any) -> Any:
            return await self._answer(method, await request_of(request), context)

        return unary

    def services_for_worker(self) -> list[Service]:
        """The fake's services as :class:`hsu.worker.Service` objects, for a Worker."""
        out = []
        for name, desc in self.services.items():
            handler = self._handler(desc)

            def add(_servicer: Any, server: Any, handler: Any = handler) -> None:
                server.add_generic_rpc_handlers((handler,))

            out.append(Service(self, add, name))
        return out


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def hsu_kernel_factory(tmp_path: Path) -> AsyncIterator[KernelFactory]:
        kernels: list[Kernel] = []

        async def make(raw: dict[str, Any], **kwargs: Any) -> Kernel:
            kwargs.setdefault("base_dir", str(tmp_path))
            kernel = build_kernel(raw, **kwargs)
            kernels.append(kernel)
            await kernel.start()
            return kernel

        try:
            yield make
        finally:
            for kernel in reversed(kernels):
                await kernel.stop("test finished")

    @pytest_asyncio.fixture
    async def hsu_kernel(
        tmp_path: Path,
    ) -> AsyncIterator[Callable[..., Awaitable[KernelHarness]]]:
        """``await hsu_kernel(deployment_dict, plugins=[...])``: a started
        :class:`KernelHarness` (stopped, with its instances, after the test);
        takes :func:`build_kernel`'s arguments."""
        kernels: list[Kernel] = []

        async def make(raw: dict[str, Any], **kwargs: Any) -> KernelHarness:
            kwargs.setdefault("base_dir", str(tmp_path))
            kernel = build_kernel(raw, **kwargs)
            harness = KernelHarness(kernel)  # before start: it sees every event
            kernels.append(kernel)
            await kernel.start()
            return harness

        try:
            yield make
        finally:
            for kernel in reversed(kernels):
                await kernel.stop("test finished")

    @pytest_asyncio.fixture
    async def hsu_server() -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
        """``await hsu_server(servicer, ..., **worker_options)``: servicers plus
        Core, health and reflection on a loopback port (stopped after the test)."""
        servers: list[TestServer] = []

        async def make(*servicers: Any, **options: Any) -> TestServer:
            server = serve_standalone(*servicers, **options)
            await server.start()
            servers.append(server)
            return server

        try:
            yield make
        finally:
            for server in reversed(servers):
                await server.stop()

    @pytest_asyncio.fixture
    async def hsu_fake_hsu(
        hsu_server: Callable[..., Awaitable[TestServer]],
    ) -> Callable[..., Awaitable[FakeHsu]]:
        """``await hsu_fake_hsu("pkg.v1.Service", ...)``: a served :class:`FakeHsu`
        (its ``address`` and ``server`` set; stopped after the test)."""

        async def make(*services: str, **options: Any) -> FakeHsu:
            fake = FakeHsu(*services)
            fake.server = await hsu_server(*fake.services_for_worker(), **options)
            fake.address = fake.server.address
            return fake

        return make
