"""A C data plane for the gateway: nginx's ``grpc_pass``, fed from the registry.

Opt in per deployment (``plugins: [hsu_plugins.gateway.nginx]``); nginx must be
installed (Debian: ``apt-get install nginx-light``). The kernel then runs one
nginx on its data-plane address: nginx forwards each interface's calls
straight to that interface's serving instances, and a unit's interface with
no instance yet (or one only other kernels' instances serve), health and
reflection to the kernel's data plane, whose Python gateway starts an
instance on demand. Nothing else is proxied: the Kernel API and the kernel's
Core (``hsu.kernel.v1.Kernel``, ``hsu.core.v1.Core``) and any interface no
unit serves get UNIMPLEMENTED from nginx itself. The kernel's data plane
moves to a private address (the plugin answers ``hsu_kernel_address``): a
socket in the state directory, or a loopback port when the kernel runs as
root (its workers then run as ``gateway_nginx.user``, who cannot enter the
0700 state directory). ``gateway_nginx.address`` puts nginx on an address of
its own instead, and leaves the kernel where it was.

What nginx.conf holds comes partly from HSUs (the addresses and interfaces
they register): every string is quoted, and an address or interface name
that is not well formed is left out, with a warning naming the instance.

Each kernel gets one :class:`DataPlane`, registered in ``hsu_kernel_configure``
as that kernel's plugin state (``kernel.plugin(PLANE)``): its ``hsu_*`` methods
are the hooks that run nginx for the kernel's life, and it goes with the kernel.

The kernel binds nginx's listening sockets itself and hands them over at exec
(nginx's ``NGINX`` inherited-socket variable): a port in use fails the
kernel's start with the address in the message, port 0 works, and nginx can
be restarted without the port ever being closed. nginx dies with the kernel
(``setpriv --pdeathsig``, from util-linux); one left behind anyway is ended at the next start.

Whenever the registry changes, the configuration is written again and nginx
reloads it (SIGHUP): old workers finish their calls, new ones route anew. A
second, loopback-only listener answers ``/generation`` with the number of the
configuration that serves, so the plane knows when a reload took: before a
draining instance's calls are counted down, the kernel waits until nginx
sends it no new call (the plane's ``hsu_instance_draining``). If nginx exits,
it is started again with backoff.

Each unit's ``routing:`` maps onto nginx:

==========================  =====================================================
balancer                    ``round_robin``: nginx's default;
                            ``weighted_round_robin``: ``weight=`` per server;
                            ``least_inflight``: ``least_conn``;
                            ``random``: ``random``; ``p2c``: ``random two least_conn``;
                            ``ring_hash``/``maglev``: ``hash $http_<hash_key> consistent``
breaker                     ``consecutive``: ``max_fails=failures fail_timeout=cooldown``;
                            ``none``: ``max_fails=0``; others: nginx's defaults
idempotent, max_attempts    ``grpc_next_upstream error timeout non_idempotent`` with
                            ``grpc_next_upstream_tries`` for those methods (plain
                            names and ``*``; glob patterns are not mapped); other
                            methods are passed on only if not yet sent
==========================  =====================================================

What nginx routes, the kernel does not see; with ``call_log`` on (the
default) nginx sends it one access-log line per call routed to an instance,
and the kernel counts the call and tells ``hsu_routed_call`` of it as it
does the Python gateway's (:mod:`hsu_plugins.gateway.nginx_calls`).

Why: the Python gateway costs the kernel more CPU per call than the HSU
spends answering it; through nginx, calls ran at 0.65-0.88x of direct where
the Python gateway managed 0.44-0.52x (two ``nox -s bench`` runs on a 2-CPU
machine, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
from loguru import logger

import hsu
from hsu import validate
from hsu.config import Seconds
from hsu.errors import HsuError, InvalidValue
from hsu.identity import METADATA as IDENTITY_METADATA
from hsu.ports import DataPlane as MovedPlane
from hsu.ports import Endpoint, InstanceView, KernelAPI, Registry, RegistryCompacted
from hsu.process import PidfdHandle
from hsu_plugins.gateway.nginx_auth import AuthEndpoint
from hsu_plugins.gateway.nginx_calls import FORMAT, CallLog, log_format

SECTION = "gateway_nginx"
#: the name a kernel's :class:`DataPlane` is registered under: ``kernel.plugin(PLANE)``
PLANE = "gateway_nginx.plane"
#: the longest unix socket path the kernel's private socket may have
MAX_UNIX_PATH = 100
#: the kernel's control API: never proxied, whatever a unit or an HSU declares
NEVER_PROXIED = ("hsu.kernel.v1.Kernel", "hsu.core.v1.Core")
#: what the kernel's data plane serves besides the units' interfaces
KERNEL_SERVES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
#: a method's name
METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _listen_address(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        try:
            validate.listen_address(value, field=attribute.name)
        except InvalidValue as exc:
            raise ValueError(str(exc).removeprefix(f"{attribute.name}: ")) from None


@attrs.frozen
class Settings:
    #: where nginx listens; empty: the kernel's own address (the kernel then
    #: listens on a private socket in its state directory)
    address: str = attrs.field(default="", validator=_listen_address)
    #: the nginx executable (a name on PATH or a path)
    binary: str = "nginx"
    workers: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: seconds to wait after a registry change before reloading, to batch changes
    reload_delay: Seconds = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    #: seconds nginx gets to start serving
    start_timeout: Seconds = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    #: seconds a reload gets to take before it is reported as failed
    reload_timeout: Seconds = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    #: seconds of nginx's idle stream timeouts (long streams such as WatchEvents)
    stream_timeout: Seconds = attrs.field(default=86400.0, validator=attrs.validators.gt(0))
    #: the user nginx's workers run as when the kernel runs as root (never
    #: root); its primary group goes with it. Empty: ``nobody``
    user: str = ""
    #: the most bytes one call's request body may carry (all its messages
    #: together), nginx's ``client_max_body_size``; 0: no bound, as with the
    #: Python gateway (each message stays bounded by the HSU's own limit,
    #: 4 MiB by default in grpcio). Past it the call ends RESOURCE_EXHAUSTED
    max_request_bytes: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: nginx tells the kernel of each call it routes (an access-log line per
    #: call): counted in ``grpc_server_*`` and told to ``hsu_routed_call`` as
    #: the Python gateway's calls are. Off: the kernel sees none of them
    call_log: bool = True


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, Settings)


@hsu.hookimpl
def hsu_kernel_configure(kernel: KernelAPI) -> None:
    # the kernel's own plugin state: its hooks are called for this kernel
    # only, and it is unregistered once the kernel has stopped
    kernel.register_plugin(DataPlane(kernel, kernel.settings(SECTION)), PLANE)


class DataPlane:
    """One nginx, its sockets, its configuration, and the tasks that keep them.

    Registered per kernel (:data:`PLANE`); the ``hsu_*`` methods are its hooks.
    """

    def __init__(self, kernel: KernelAPI, settings: Settings):
        self.kernel = kernel
        self.settings = settings
        self.dir = Path(kernel.state_dir, "nginx")
        self.conf = self.dir / "nginx.conf"
        #: the address asked for; :attr:`address` is the one bound
        self.requested = settings.address
        self.address = ""
        #: serving endpoints by instance_id, as last seen in the registry
        self.endpoints: dict[str, Endpoint] = {}
        #: the number of the configuration last written (0: none yet)
        self.generation = 0
        #: how many times nginx was started (1 at the kernel's start)
        self.starts = 0
        self.handle: PidfdHandle | None = None
        self._public: socket.socket | None = None
        self._control: socket.socket | None = None
        self._listen = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: asyncio.TimerHandle | None = None
        #: ``user`` and ``group`` the workers run as (None: as the kernel, not root)
        self.worker: tuple[str, str] | None = None
        #: what was left out of the configuration and said so (once each)
        self._refused: set[str] = set()
        #: nginx started serving; the kernel's drains wait for it from then
        self._started = False
        self._stopping = False
        #: with auth on: what nginx asks before it forwards a call (and its address)
        self.auth: AuthEndpoint | None = None
        self.auth_address = ""
        #: with ``call_log`` (and metrics or an ``hsu_routed_call`` plugin):
        #: where nginx's lines of the calls it routed arrive
        self.calls: CallLog | None = None

    # -- hooks --------------------------------------------------------------------

    @hsu.hookimpl
    def hsu_kernel_address(self, requested: str) -> MovedPlane | None:
        """nginx takes the kernel's address, unless it has one of its own; with
        auth on it asks the kernel about every call it forwards (auth_request)."""
        if self.settings.address:
            return None
        self.requested = requested
        return MovedPlane(self.private_address(), enforces_auth=True)

    @hsu.hookimpl
    def hsu_kernel_starting(self) -> None:
        self.bind()

    @hsu.hookimpl
    def hsu_kernel_started(self) -> Awaitable[None]:
        return self.start()

    @hsu.hookimpl
    def hsu_kernel_stopping(self) -> Awaitable[None]:
        return self.stop()

    @hsu.hookimpl
    def hsu_kernel_stopped(self) -> None:
        self.close()

    @hsu.hookimpl
    def hsu_config_reloaded(self) -> None:
        if self.generation:
            self.schedule()  # a unit's routing may have changed

    @hsu.hookimpl
    def hsu_instance_draining(self, instance: InstanceView) -> Awaitable[None] | None:
        if not self._started or self._stopping:
            return None  # nginx sends nothing anywhere
        return self.withdraw(instance.instance_id)

    def private_address(self) -> str:
        """Where the kernel's data plane moves: a socket in the state directory,
        unless nginx's workers cannot reach it there (the kernel runs as root
        and they do not; the directory is 0700) or its path is too long."""
        path = Path(self.kernel.state_dir, "kernel.sock").absolute()
        if os.geteuid() == 0 or len(str(path)) > MAX_UNIX_PATH:
            return "127.0.0.1:0"
        return f"unix:{path}"

    # -- lifecycle --------------------------------------------------------------

    def bind(self) -> None:
        """Take nginx's sockets (before the kernel listens: a clash fails the start)."""
        if self.kernel.peer_signer is not None:
            # every instance refuses a call without the cluster's proof
            raise HsuError(
                f"{SECTION}: kernel.cluster_key is set, and nginx cannot sign its calls to"
                " instances with the cluster key (hsu-peer), so every call would be"
                " refused; use the python gateway (docs/multihost.md)"
            )
        self.worker = worker_user(self.settings.user) if os.geteuid() == 0 else None
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._end_leftover()
        self._public, self._listen, self.address = _listen_on(self.requested)
        self._control = _listen_on("127.0.0.1:0")[0]

    async def start(self) -> None:
        binary = shutil.which(self.settings.binary)
        if binary is None:
            raise HsuError(
                f"{SECTION}: nginx executable {self.settings.binary!r} not found;"
                " install it (Debian: apt-get install nginx-light) or set"
                f" {SECTION}.binary"
            )
        registry = self._registry()
        endpoints, revision = await registry.snapshot()
        self.endpoints = {e.instance_id: e for e in endpoints if e.routable}
        if self.kernel.settings("auth").enabled:
            # root's workers cannot enter the 0700 state dir: loopback TCP then
            self.auth = AuthEndpoint(self.kernel, self.dir, tcp=os.geteuid() == 0)
            self.auth_address = await self.auth.start()
        if self.settings.call_log and self.kernel.call_observer is not None:
            self.calls = CallLog(self.kernel)
            self.calls.open()
        await self._spawn(binary)
        self._started = True
        logger.info(
            "gateway_nginx: nginx (pid {}) serving on {}; the kernel listens on {}",
            self.pid,
            self.address,
            self.kernel.address,
        )
        self._tasks.append(asyncio.ensure_future(self._follow(revision)))
        self._tasks.append(asyncio.ensure_future(self._supervise(binary)))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        try:
            await self._end_nginx()
        finally:
            if self.auth is not None:  # after nginx: its calls in flight asked first
                await self.auth.stop()
            if self.calls is not None:  # after nginx: the lines of its last calls read
                self.calls.drain()
                await self.calls.close()

    async def _end_nginx(self) -> None:
        handle = self.handle
        if handle is None or handle.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGQUIT)  # graceful: calls in flight finish
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handle.wait(), self.kernel.settings("kernel").drain_grace)
        handle.signal(signal.SIGKILL)  # the master and any worker left (its group)
        await handle.wait()

    def close(self) -> None:
        for sock in (self._public, self._control):
            if sock is not None:
                sock.close()
        self._public = self._control = None
        if self.calls is not None:
            self.calls.shut()

    @property
    def pid(self) -> int:
        return self.handle.pid if self.handle is not None else 0

    def _registry(self) -> Registry:
        registry = self.kernel.registry
        if registry is None:  # the kernel makes it before hsu_kernel_started
            raise HsuError(f"{SECTION}: the kernel has no registry yet")
        return registry

    async def _spawn(self, binary: str) -> None:
        assert self._public is not None and self._control is not None
        fds = (self._public.fileno(), self._control.fileno())
        self._write()
        log = (self.dir / "error.log").open("ab")
        argv = [
            binary,
            "-p",
            f"{self.dir}/",
            "-c",
            str(self.conf),
            "-e",
            str(self.dir / "error.log"),
        ]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # nginx ends (and ends its workers) when the kernel dies; through
            # util-linux's setpriv, as a preexec_fn would fork() a process
            # whose gRPC threads make fork unsafe
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        try:
            # fork+exec takes a millisecond or two: not worth a thread
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=fds,
                env={**os.environ, "NGINX": "".join(f"{fd};" for fd in fds)},
                start_new_session=True,  # its own group: its workers go with it
            )
        except OSError as exc:
            raise HsuError(f"{SECTION}: cannot start {binary}: {exc}") from None
        finally:
            log.close()
        self.handle = PidfdHandle(proc.pid, child=True, owned=True, popen=proc)
        self.starts += 1
        if not await self._until_serving(self.generation, self.settings.start_timeout):
            self.handle.signal(signal.SIGKILL)
            code = await self.handle.wait()
            raise HsuError(
                f"{SECTION}: nginx did not start (exit status {code}): {self._log_tail()}"
            )

    async def _supervise(self, binary: str) -> None:
        """nginx exited on its own: start it again, with backoff."""
        backoff = 0.1
        while not self._stopping:
            assert self.handle is not None
            started = time.monotonic()
            code = await self.handle.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 10:
                backoff = 0.1
            logger.error(
                "gateway_nginx: nginx (pid {}) exited with status {}; starting it again"
                " in {:.1f} s: {}",
                self.handle.pid,
                code,
                backoff,
                self._log_tail(),
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            try:
                await self._spawn(binary)
            except HsuError as exc:
                logger.error("{}", exc)

    def _end_leftover(self) -> None:
        """An nginx left by an earlier kernel (should its parent-death signal have missed)."""
        try:
            pid = int((self.dir / "nginx.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.conf).encode() in cmdline:  # ours, not a reused pid
            logger.warning("gateway_nginx: ending nginx pid {} left by an earlier kernel", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def _log_tail(self) -> str:
        try:
            lines = (self.dir / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no error log)"
        return " | ".join(lines[-3:]) or "(error log empty)"

    # -- reloads ----------------------------------------------------------------

    async def serving_generation(self) -> int:
        """The number of the configuration nginx serves (0: none, or not answering)."""
        assert self._control is not None
        host, port = self._control.getsockname()[:2]
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return 0
        try:
            writer.write(b"GET /generation HTTP/1.0\r\nHost: hsu\r\n\r\n")
            data = await reader.read(4096)
        except OSError:
            return 0
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(body) if head.startswith(b"HTTP/1.1 200") and body.isdigit() else 0

    async def _until_serving(self, generation: int, timeout: float) -> bool:
        """Wait until nginx serves ``generation`` (or a newer one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.handle is None or self.handle.returncode is not None:
                return False
            if await self.serving_generation() >= generation:
                return True
            await asyncio.sleep(0.005)
        return False

    async def withdraw(self, instance_id: str) -> None:
        """Return once nginx sends the (draining) instance no new call: the
        new configuration serves, and the workers of the old one have exited
        (an old worker still takes new streams on a client's HTTP/2
        connection it holds until it closes it; a call it then sent to the
        stopping instance came back CANCELLED). Bounded by ``reload_timeout``."""
        deadline = time.monotonic() + self.settings.reload_timeout
        old: set[int] = set()
        if self.endpoints.pop(instance_id, None) is not None or self._pending is not None:
            old = self._worker_pids()
            self.reload()
        await self._until_serving(self.generation, self.settings.reload_timeout)
        while old and time.monotonic() < deadline:
            old &= self._worker_pids()
            if old:
                await asyncio.sleep(0.02)

    def _worker_pids(self) -> set[int]:
        """nginx's worker processes now (the master's children)."""
        if self.handle is None or self.handle.returncode is not None:
            return set()
        try:
            with open(f"/proc/{self.handle.pid}/task/{self.handle.pid}/children") as f:
                return {int(p) for p in f.read().split()}
        except (OSError, ValueError):
            return set()

    def schedule(self) -> None:
        if self._pending is None:
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(self.settings.reload_delay, self.reload)

    def reload(self) -> None:
        """Write the configuration and have nginx load it (now)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self.handle is None or self.handle.returncode is not None:
            return  # not running: the next start writes the configuration
        self._write()
        os.kill(self.handle.pid, signal.SIGHUP)  # our unreaped child: the pid is its own
        self._tasks.append(asyncio.ensure_future(self._confirm(self.generation)))

    async def _confirm(self, generation: int) -> None:
        task = asyncio.current_task()
        try:
            if not await self._until_serving(generation, self.settings.reload_timeout):
                logger.error(
                    "gateway_nginx: nginx did not load configuration {} within {} s: {}",
                    generation,
                    self.settings.reload_timeout,
                    self._log_tail(),
                )
        finally:
            with contextlib.suppress(ValueError):
                self._tasks.remove(task)  # type: ignore[arg-type]

    # -- following the registry ------------------------------------------------

    async def _follow(self, revision: int) -> None:
        registry = self._registry()
        while True:
            try:
                async for event in registry.watch(revision):
                    ep = event.endpoint
                    if event.kind == "put" and ep.routable:
                        changed = self.endpoints.get(ep.instance_id) != ep
                        self.endpoints[ep.instance_id] = ep
                    else:
                        changed = self.endpoints.pop(ep.instance_id, None) is not None
                    if changed:
                        self.schedule()
                return
            except RegistryCompacted:
                endpoints, revision = await registry.snapshot()
                self.endpoints = {e.instance_id: e for e in endpoints if e.routable}
                self.schedule()

    # -- the configuration -------------------------------------------------------

    def _write(self) -> None:
        self.generation += 1
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(self.render())
        os.replace(tmp, self.conf)

    def render(self) -> str:
        """nginx.conf for the kernel's settings and the endpoints last seen.

        Every string is quoted (:func:`quote`); what HSUs registered is checked
        first (:meth:`_address`, :meth:`_interfaces`) and left out when it is
        not well formed. Only the units' interfaces, health and reflection are
        routed; anything else is UNIMPLEMENTED from nginx itself.
        """
        s = self.settings
        control = "127.0.0.1:0"
        if self._control is not None:
            control = "{}:{}".format(*self._control.getsockname()[:2])
        stream = f"{max(1, round(s.stream_timeout))}s"
        # "": the kernel serves no data plane (no gateway plugin)
        kernel = callable_address(self.kernel.address)
        kernel = self._address("the kernel", kernel) if kernel else ""
        lines = [
            # never root: workers parse what clients send (nginx ignores
            # ``user`` unless its master runs as root)
            *([f"user {quote(self.worker[0])} {quote(self.worker[1])};"] if self.worker else []),
            f"worker_processes {s.workers};",
            "daemon off;",
            f"pid {quote(f'{self.dir}/nginx.pid')};",
            f"error_log {quote(f'{self.dir}/error.log')} warn;",
            "events { worker_connections 4096; }",
            "http {",
            "  access_log off;",
            f"  client_body_temp_path {quote(f'{self.dir}/body')};",
            # a client stream's total has no bound by default: the Python
            # gateway has none, and each message is bounded by the HSU itself
            f"  client_max_body_size {int(s.max_request_bytes)};",
            f"  grpc_read_timeout {stream};",
            f"  grpc_send_timeout {stream};",
            f"  client_body_timeout {stream};",
            f"  send_timeout {stream};",
        ]
        calls = self.calls
        if calls is not None:
            # a call nginx routed to an instance (a unit's location set
            # $hsu_unit, and an upstream was tried): one line to the kernel.
            # The kernel's own locations are not logged: its gateway counts them
            lines += [
                log_format(calls.token),
                # 1, not the unit's name: a unit named "0" is a name, not false
                '  map $hsu_unit $hsu_in_unit { "" ""; default 1; }',
                '  map $upstream_addr $hsu_log { "" ""; default $hsu_in_unit; }',
            ]
        # with auth on: nginx asks the kernel before it forwards to an instance
        guard = ""
        if self.auth_address:
            lines += [
                "  upstream hsu_auth {",
                f"    server {quote(self.auth_address)};",
                "    keepalive 8;",
                "  }",
                "  map $hsu_reason $hsu_auth_message {",
                '    "" "hsu gateway_nginx: the kernel did not answer the auth check; refused";',
                "    default $hsu_reason;",
                "  }",
            ]
            guard = (
                " auth_request /_hsu_auth; auth_request_set $hsu_reason"
                " $upstream_http_x_hsu_reason;"
                # the credential stays with the kernel; an identity header is
                # the kernel's to set, never the caller's
                ' grpc_set_header authorization "";'
                f' grpc_set_header {IDENTITY_METADATA} "";'
            )
        if kernel:
            lines += [
                "  upstream hsu_kernel {",
                f"    server {quote(kernel)};",
                "    keepalive 16;",
                "  }",
            ]
        # interfaces with a location of their own (and those never proxied)
        routed: set[str] = set(NEVER_PROXIED) | set(KERNEL_SERVES)
        locations: list[str] = []
        for n, (unit, spec) in enumerate(sorted(self.kernel.deployment.units.items())):
            if spec.routing.max_inflight is not None:
                # through the kernel's queue (docs/routing.md): nginx's
                # max_conns turns a call over the limit away at once (502;
                # its upstream ``queue`` is not in open-source nginx) and
                # counts only its own calls, not hsu.connect's
                continue
            members = sorted(
                (
                    (e, self._interfaces(e))
                    for e in self.endpoints.values()
                    if e.unit == unit and self._address(_instance(e), e.address)
                ),
                key=lambda m: m[0].instance_id,
            )
            interfaces = sorted({i for _, found in members for i in found} - routed)
            members = [(e, found) for e, found in members if found]
            if not members or not interfaces:
                continue  # no instance: the kernel starts one
            routed.update(interfaces)
            name = f"hsu_unit_{n}"
            # the unit nginx's line of a call names (names are [a-z0-9_-])
            tag = ""
            if calls is not None:
                calls.units.add(unit)
                tag = f" set $hsu_unit {quote(unit)};"
                for interface in interfaces:  # asked once, off the calls' path
                    calls.learn(interface, members[0][0].address)
            r = spec.routing
            lines.append(f"  upstream {name} {{")
            directive = _balancing(r.balancer, r.hash_key)
            if directive:
                lines.append(f"    {directive}")
            fails = _fails(r.breaker, r.breaker_options)
            weighted = r.balancer == "weighted_round_robin"
            for e, _ in members:
                weight = f" weight={int(e.weight)}" if weighted else ""
                lines.append(f"    server {quote(e.address)}{weight}{fails};")
            lines += ["    keepalive 32;", "  }"]
            retry = (
                "grpc_next_upstream error timeout non_idempotent;"
                f" grpc_next_upstream_tries {int(r.max_attempts)};"
            )
            for interface in interfaces:
                prefix = quote(f"/{interface}/")
                if "*" in r.idempotent:
                    locations.append(
                        f"    location {prefix} {{{tag}{guard} grpc_pass grpc://{name}; {retry} }}"
                    )
                    continue
                for method in r.idempotent:
                    short = method.rpartition("/")[2]
                    if "/" in method and not method.startswith(f"{interface}/"):
                        continue
                    if not METHOD.fullmatch(short):
                        continue  # glob patterns are not mapped
                    exact = quote(f"/{interface}/{short}")
                    locations.append(
                        f"    location = {exact} {{{tag}{guard} grpc_pass grpc://{name}; {retry} }}"
                    )
                # the rest: passed to another instance only if not sent yet
                locations.append(
                    f"    location {prefix} {{{tag}{guard} grpc_pass grpc://{name}; }}"
                )
        if kernel:
            # to the kernel's data plane: a unit's interface with no instance
            # here (its gateway starts one), health and reflection
            for interface in [*KERNEL_SERVES, *sorted(self._unit_interfaces() - routed)]:
                locations.append(
                    f"    location {quote(f'/{interface}/')}"
                    " { grpc_pass grpc://hsu_kernel; grpc_next_upstream off; }"
                )
        lines += [
            "  server {",
            f"    listen {quote(self._listen or self.requested)} http2;",
            *(
                [
                    f"    access_log syslog:server={calls.address},nohostname,tag=hsu"
                    f" {FORMAT} if=$hsu_log;",
                ]
                if calls is not None
                else []
            ),
            # every error nginx itself answers is a gRPC status in
            # trailers-only form (a bare HTTP error reaches a client as
            # UNKNOWN); an instance that failed a call is UNAVAILABLE, which a
            # client's gRPC retry policy retries. With auth on, 401, 403 and
            # 500 carry the kernel's answer to the auth subrequest instead
            *_error_pages(AUTH_CODES if self.auth_address else frozenset()),
            *(self._auth_locations() if self.auth_address else []),
            *locations,
            # everything else, the kernel's control API among it: never proxied
            "    location / {",
            *_grpc_status(12, "hsu gateway_nginx: not served on this address"),
            "    }",
            "  }",
            "  server {",
            f"    listen {quote(control)};",
            "    default_type text/plain;",
            f'    location = /generation {{ return 200 "{int(self.generation)}"; }}',
            # declares $hsu_unit (a server-wide ``set`` would also run in
            # the auth subrequest, which shares the call's variables, and
            # clear the unit its location set); never served to a call
            *(['    location @hsu_declare { set $hsu_unit ""; }'] if calls is not None else []),
            "    location / { return 404; }",
            "  }",
            "}",
            "",
        ]
        return "\n".join(lines)

    def _auth_locations(self) -> list[str]:
        """The auth subrequest and what its refusals become: gRPC statuses in
        trailers-only form, with the kernel's reason as their message."""
        return [
            "    error_page 401 = @hsu_unauthenticated;",
            "    error_page 403 = @hsu_denied;",
            "    error_page 500 = @hsu_auth_failed;",
            "    location @hsu_unauthenticated {",
            *_grpc_status(16, "$hsu_reason", variable=True),
            "    }",
            "    location @hsu_denied {",
            *_grpc_status(7, "$hsu_reason", variable=True),
            "    }",
            "    location @hsu_auth_failed {",
            *_grpc_status(14, "$hsu_auth_message", variable=True),
            "    }",
            "    location = /_hsu_auth {",
            "      internal;",
            # Fail closed: an error_page of its own (for a status that never
            # comes) keeps the server's from being inherited, which would turn
            # the subrequest's 502 (the kernel not answering) into a 204: allow
            "      error_page 599 = @hsu_auth_failed;",
            "      proxy_pass http://hsu_auth;",
            "      proxy_http_version 1.1;",
            '      proxy_set_header Connection "";',
            "      proxy_pass_request_body off;",
            '      proxy_set_header Content-Length "";',
            "      proxy_set_header X-Hsu-Method $request_uri;",
            "      proxy_set_header X-Hsu-Peer $remote_addr:$remote_port;",
            "    }",
        ]

    def _unit_interfaces(self) -> set[str]:
        """The interfaces the units declare and the instances serve (well formed)."""
        found = {
            i
            for unit, spec in self.kernel.deployment.units.items()
            for i in spec.interfaces
            if self._interface(f"unit {unit}", i)
        }
        for e in self.endpoints.values():
            found.update(self._interfaces(e))
        return found

    def _interfaces(self, e: Endpoint) -> set[str]:
        return {i for i in e.interfaces if self._interface(_instance(e), i)}

    def _address(self, who: str, address: str) -> str:
        """``address`` if it is fit for nginx.conf, else "" (said once)."""
        try:
            return validate.address(address, field=f"{who}: address")
        except HsuError as exc:
            self._refuse(f"{who}\x00{address}", str(exc))
            return ""

    def _interface(self, who: str, name: str) -> bool:
        try:
            validate.interface_name(name, field=f"{who}: interface")
        except HsuError as exc:
            self._refuse(f"{who}\x00{name}", str(exc))
            return False
        if name in NEVER_PROXIED:
            self._refuse(
                f"{who}\x00{name}", f"{who}: interface {name!r}: the kernel's own, never proxied"
            )
            return False
        return True

    def _refuse(self, key: str, problem: str) -> None:
        if key not in self._refused:
            self._refused.add(key)
            logger.warning("gateway_nginx: {}; left out of nginx.conf", problem)


def _instance(e: Endpoint) -> str:
    return f"instance {validate.shown(e.instance_id)}"


def _listen_on(address: str) -> tuple[socket.socket, str, str]:
    """A listening, non-blocking socket on ``address``; with nginx's ``listen``
    argument for it and the address bound (port 0 resolved)."""
    try:
        if address.startswith("unix:"):
            path = address[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with _closed_on_error(sock):
                sock.bind(path)
            listen = bound = address
        else:
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit():
                raise HsuError(f"{SECTION}: address {address!r} is not HOST:PORT or unix:PATH")
            host = host.strip("[]") or "0.0.0.0"
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            with _closed_on_error(sock):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
            ip, real_port = sock.getsockname()[:2]
            text = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
            listen = f"{text}:{real_port}"
            bound = f"{host if ':' not in host else f'[{host}]'}:{real_port}"
        with _closed_on_error(sock):
            sock.listen(4096)
            sock.setblocking(False)
    except OSError as exc:
        raise HsuError(f"{SECTION}: cannot listen on {address}: {exc}; is it in use?") from None
    return sock, listen, bound


@contextlib.contextmanager
def _closed_on_error(sock: socket.socket) -> Iterator[None]:
    try:
        yield
    except BaseException:
        sock.close()
        raise


def worker_user(name: str) -> tuple[str, str]:
    """The user (``name``, else ``nobody``) and group nginx's workers run as.

    Refuses a user that does not exist or is root (uid 0).
    """
    name = name or "nobody"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise HsuError(f"{SECTION}.user: no user {name!r} on this machine") from None
    if entry.pw_uid == 0:
        raise HsuError(f"{SECTION}.user: {name!r} is uid 0; nginx's workers never run as root")
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        raise HsuError(
            f"{SECTION}.user: {name!r}'s group {entry.pw_gid} has no name in /etc/group"
        ) from None
    return entry.pw_name, group


def callable_address(address: str) -> str:
    """``address`` as one calls it: an unspecified host (where a server
    listens on every interface) is loopback."""
    host, sep, port = address.rpartition(":")
    loopback = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host)
    return f"{loopback}:{port}" if sep and loopback else address


def quote(text: str) -> str:
    """``text`` as one nginx string: in double quotes, ``"`` and ``\\`` escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _grpc_status(code: int, message: str, *, variable: bool = False) -> list[str]:
    """A location body answering gRPC status ``code`` in trailers-only form
    (``message`` a variable of nginx's when ``variable``: already encoded)."""
    return [
        "      default_type application/grpc;",
        f"      add_header grpc-status {code} always;",
        f"      add_header grpc-message {message if variable else quote(message)} always;",
        "      add_header content-length 0 always;",
        "      return 204;",
    ]


#: what nginx's own HTTP errors mean in gRPC: (HTTP codes, gRPC code, message).
#: gRPC's HTTP-to-status table (doc/http-grpc-status-mapping.md) where it
#: has the code; the rest by what nginx means by it (413: the body is over
#: ``max_request_bytes``; 408: the client sent nothing for ``stream_timeout``)
NGINX_ERRORS: tuple[tuple[tuple[int, ...], int, str], ...] = (
    ((400, 411), 13, "malformed request"),
    ((401,), 16, "unauthenticated"),
    ((403,), 7, "permission denied"),
    ((404, 405), 12, "not served on this address"),
    ((408,), 4, "the request body timed out"),
    ((413,), 8, "request body larger than gateway_nginx.max_request_bytes"),
    ((414, 431, 494), 8, "request headers too large"),
    ((429,), 8, "too many requests"),
    ((500, 501, 505, 507), 13, "internal error"),
    ((502, 503, 504), 14, "instance unavailable"),
)


#: the HTTP codes the auth subrequest's answers take over (auth on)
AUTH_CODES = frozenset({401, 403, 500})


def _error_pages(but: frozenset[int] = frozenset()) -> list[str]:
    """``error_page`` and a named location per :data:`NGINX_ERRORS` entry
    (for its codes not in ``but``)."""
    lines: list[str] = []
    for all_codes, grpc_code, message in NGINX_ERRORS:
        codes = tuple(c for c in all_codes if c not in but)
        if not codes:
            continue
        name = f"@hsu_error_{codes[0]}"
        lines += [
            f"    error_page {' '.join(map(str, codes))} = {name};",
            f"    location {name} {{",
            *_grpc_status(grpc_code, f"hsu gateway_nginx: {message}"),
            "    }",
        ]
    return lines


def _header_variable(name: str) -> str:
    return "$http_" + re.sub(r"[^a-z0-9_]", "_", name.lower())


def _balancing(balancer: str | None, hash_key: str) -> str:
    return {
        "least_inflight": "least_conn;",
        "random": "random;",
        "p2c": "random two least_conn;",
        "ring_hash": f"hash {_header_variable(hash_key)} consistent;",
        "maglev": f"hash {_header_variable(hash_key)} consistent;",
    }.get(balancer or "", "")


def _fails(breaker: str | None, options: Mapping[str, Any]) -> str:
    if breaker == "none":
        return " max_fails=0"
    if breaker == "consecutive":
        failures = int(options.get("failures", 5))
        cooldown = float(options.get("cooldown", 5.0))
        return f" max_fails={failures} fail_timeout={max(1, round(cooldown))}s"
    return ""
