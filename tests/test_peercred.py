"""``peercred``: on the unix control socket, the caller is its uid.

Real kernels, real gRPC over the kernel's unix control socket, the kernel's
own proxy reading ``SO_PEERCRED``. The owner (root here) calls everything;
another local user (uid 65534 through ``setpriv``) on a socket widened to
0666 is refused, or allowed what a grant gives it; a connection straight to
the gRPC server behind the proxy has no credentials; HSUs still register
and a routed call works; the proxy's connections end with the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from conftest import hsu_env
from hsu._kernel import peercred as proxy_module
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import HsuError
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.ports import CallInfo, Decision, Identity, PeerCredentials
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.auth.peercred import (
    PeercredAuthenticator,
    PeercredAuthorizer,
    PeercredSettings,
    PeerGrant,
)

ECHO = "hsu.echo.v1.Echo"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def deployment(
    name: str = "pc",
    *,
    grants: list[dict[str, Any]] | None = None,
    socket_mode: str | None = None,
    control: str | None = None,
) -> dict[str, Any]:
    section: dict[str, Any] = {"grants": grants or []}
    if socket_mode is not None:
        section["socket_mode"] = socket_mode
    raw: dict[str, Any] = {
        "name": name,
        "auth": {"authenticators": ["peercred"], "authorizers": ["peercred"]},
        "peercred": section,
        "units": {
            "echo": {"command": [sys.executable, "-m", "hsu_echo"], "interfaces": [ECHO]},
        },
    }
    raw["kernel"] = {"drain_grace": 0.5}  # a stream left open does not hold the stop long
    if control is not None:
        raw["kernel"]["control"] = control
    return raw


def proxy_of(kernel: hsu.Kernel) -> proxy_module.PeerProxy:
    server = kernel._server
    assert server is not None and server.proxy is not None
    return server.proxy


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A deployment folder any user may enter, with ``run/`` (0755, root's)
    for a control socket other users may reach (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="hsu-pc-"))
    path.chmod(0o755)
    (path / "run").mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


ATTACK = """
import json, sys, grpc
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
out = {}
with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = kernel_pb2_grpc.KernelStub(ch)
    calls = {
        "Status": lambda: stub.Status(kernel_pb2.StatusRequest(), timeout=5),
        "Scale": lambda: stub.Scale(kernel_pb2.ScaleRequest(unit="echo", count=2), timeout=5),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = ["OK", ""]
        except grpc.RpcError as exc:
            out[name] = [exc.code().name, exc.details() or ""]
print(json.dumps(out))
"""


def attack(address: str) -> dict[str, list[str]]:
    """Status and Scale as uid 65534: name -> [status code, details]."""
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-c", ATTACK, address],
        capture_output=True,
        text=True,
        timeout=60,
        env=hsu_env(),
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    found: dict[str, list[str]] = json.loads(proc.stdout)
    return found


async def test_the_owner_calls_everything_and_hsus_still_register(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment())
    path = kernel.control_address.removeprefix("unix:")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        assert (await stub.Status(kernel_pb2.StatusRequest(), timeout=10)).state == "running"
        # the proxy read who connected: this process, as root
        assert PeerCredentials(os.getpid(), os.geteuid(), os.getegid()) in [
            attrs_free(c) for c in proxy_of(kernel).peers.values()
        ]
        # Scale starts an HSU, which registers with its instance token
        scaled = await stub.Scale(kernel_pb2.ScaleRequest(unit="echo", count=1), timeout=30)
        assert [i.state for i in scaled.instances] == ["ready"]
        await core_pb2_grpc.CoreStub(ch).Ping(core_pb2.PingRequest(), timeout=10)
    # the echo demo: hsu.connect resolves over the control socket as root
    async with hsu.connect(kernel.control_address) as routed:
        reply = await echo_pb2_grpc.EchoStub(routed).Echo(
            echo_pb2.EchoRequest(message="hi"), timeout=10
        )
    assert reply.message == "hi"


def attrs_free(creds: PeerCredentials) -> PeerCredentials:
    """The credentials without the supplementary groups (root's vary)."""
    return PeerCredentials(creds.pid, creds.uid, creds.gid)


async def test_another_user_gets_nothing_on_a_socket_open_to_everyone(
    open_dir: Path, hsu_kernel_factory
) -> None:
    control = f"unix:{open_dir}/run/ctl.sock"
    kernel = await hsu_kernel_factory(
        deployment(socket_mode="0666", control=control), base_dir=str(open_dir)
    )
    assert stat.S_IMODE(os.stat(open_dir / "run" / "ctl.sock").st_mode) == 0o666
    got = await asyncio.to_thread(attack, control)
    for name in ("Status", "Scale"):
        code, details = got[name]
        assert code == "PERMISSION_DENIED", got
        assert "uid:65534" in details and f"Kernel/{name}" in details, got
    assert not kernel.instances
    assert kernel.state is hsu.KernelState.RUNNING


async def test_the_cli_tells_another_user_it_was_refused(
    open_dir: Path, hsu_kernel_factory
) -> None:
    """``hsu status`` and ``hsu ping`` as uid 65534, through the CLI's own
    HTTP/2 client (hsu._kernel.h2unary): the kernel's refusal, word for word."""
    control = f"unix:{open_dir}/run/ctl.sock"
    await hsu_kernel_factory(
        deployment(socket_mode="0666", control=control), base_dir=str(open_dir)
    )

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*NOBODY, sys.executable, "-m", "hsu", *argv, "--control", control],
            capture_output=True,
            text=True,
            timeout=60,
            env=hsu_env(),
            cwd="/",
        )

    # status sends Core.Metrics first (the kernel samples while it answers the rest)
    for command, method in (("status", "Core/Metrics"), ("ping", "Core/Ping")):
        out = await asyncio.to_thread(run, command)
        assert out.returncode == 1, out.stderr
        assert out.stderr.startswith(f"hsu: error: kernel at {control}: PERMISSION_DENIED: ")
        assert "uid:65534" in out.stderr and method in out.stderr, out.stderr
        assert out.stdout == ""


async def test_a_grant_gives_another_user_its_roles_and_no_more(
    open_dir: Path, hsu_kernel_factory
) -> None:
    control = f"unix:{open_dir}/run/ctl.sock"
    kernel = await hsu_kernel_factory(
        deployment(
            socket_mode="0o666", control=control, grants=[{"uid": 65534, "roles": ["read"]}]
        ),
        base_dir=str(open_dir),
    )
    got = await asyncio.to_thread(attack, control)
    assert got["Status"] == ["OK", ""], got
    code, details = got["Scale"]
    assert code == "PERMISSION_DENIED", got
    assert "uid:65534" in details and "'control'" in details, got
    assert not kernel.instances


async def test_a_connection_around_the_proxy_has_no_credentials(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment())
    internal = proxy_of(kernel).internal
    path = internal.removeprefix("unix:")
    assert Path(path).parent == kernel.state_dir.absolute()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with grpc.aio.insecure_channel(internal) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kernel_pb2_grpc.KernelStub(ch).Status(kernel_pb2.StatusRequest(), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "peercred" in (err.value.details() or "")


async def test_an_hsu_cannot_register_the_socket_behind_the_proxy(hsu_kernel_factory) -> None:
    token = "far-unit-credential-0123456789abcdef"
    raw = deployment()
    raw["units"]["far"] = {
        "kind": "unmanaged",
        "address": "127.0.0.1:9",
        "interfaces": ["x.Far"],
        "token": token,
        "health": {"probe": "grpc"},
    }
    kernel = await hsu_kernel_factory(raw)
    internal = proxy_of(kernel).internal
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kernel_pb2_grpc.KernelStub(ch).Register(
                kernel_pb2.RegisterRequest(unit="far", address=internal, interfaces=["x.Far"]),
                metadata=(("hsu-instance-token", token),),
                timeout=10,
            )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "an address of the kernel itself" in (err.value.details() or "")


async def test_the_proxy_ends_its_connections_with_the_kernel(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment())
    proxy = proxy_of(kernel)
    public = kernel.control_address.removeprefix("unix:")
    internal = proxy.internal.removeprefix("unix:")
    ch = grpc.aio.insecure_channel(kernel.control_address)
    try:
        events = kernel_pb2_grpc.KernelStub(ch).WatchEvents(
            kernel_pb2.WatchEventsRequest(replay=True)
        )
        await asyncio.wait_for(events.read(), 10)  # a stream open through the proxy
        names = {p.removeprefix("unix-abstract:") for p in proxy.peers}
        assert names and proxy.pipes
        assert names <= _abstract_sockets()
        await kernel.stop("test")

        async def to_the_end() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await events.read() is not grpc.aio.EOF:
                    pass

        await asyncio.wait_for(to_the_end(), 10)  # the stream ended with the kernel
    finally:
        await ch.close()
    assert kernel.state is hsu.KernelState.STOPPED
    assert not proxy.pipes and not proxy.peers
    assert not names & _abstract_sockets()  # the proxy's sockets are closed
    assert not _exists(public) and not _exists(internal)
    left = [t for t in asyncio.all_tasks() if t.get_name().startswith("hsu-peercred")]
    assert left == []


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _abstract_sockets() -> set[str]:
    """The abstract unix socket names bound in this network namespace."""
    names = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@"):
            names.add(fields[7][1:])
    return names


HOLD = """
import socket, sys, time, select
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
time.sleep(1.0)
closed = 0
for s in held:
    try:
        if select.select([s], [], [], 0)[0] and s.recv(1, socket.MSG_PEEK) == b"":
            closed += 1
    except ConnectionError:
        closed += 1
print(closed)
"""


async def test_another_user_cannot_take_every_connection(
    open_dir: Path, hsu_kernel_factory
) -> None:
    control = f"unix:{open_dir}/run/ctl.sock"
    kernel = await hsu_kernel_factory(
        deployment(socket_mode="0666", control=control), base_dir=str(open_dir)
    )
    extra = 5
    proc = await asyncio.create_subprocess_exec(
        *NOBODY,
        sys.executable,
        "-c",
        HOLD,
        control.removeprefix("unix:"),
        str(proxy_module.MAX_PER_UID + extra),
        stdout=subprocess.PIPE,
        env=hsu_env(),
        cwd="/",
    )
    try:
        await asyncio.sleep(0.5)  # while that user holds its connections
        async with grpc.aio.insecure_channel(kernel.control_address) as ch:
            status = await kernel_pb2_grpc.KernelStub(ch).Status(
                kernel_pb2.StatusRequest(), timeout=10
            )
        assert status.state == "running"
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert int(out) == extra  # closed by the kernel: over that uid's share


async def test_a_widened_socket_in_a_directory_others_may_write_is_refused(
    open_dir: Path, hsu_kernel_factory
) -> None:
    os.chmod(open_dir, 0o777)
    with pytest.raises(HsuError, match="writable by other users"):
        await hsu_kernel_factory(
            deployment(socket_mode="0666", control=f"unix:{open_dir}/ctl.sock"),
            base_dir=str(open_dir),
        )
    assert not (open_dir / "ctl.sock").exists()


def test_the_plugins_answer_for_uids_and_grants() -> None:
    authn = PeercredAuthenticator()
    call = CallInfo("/hsu.kernel.v1.Kernel/Status", (), "unix:", "control")
    assert authn.authenticate(call) is None  # no peer credentials: not mine
    creds = PeerCredentials(pid=42, uid=1000, gid=100, groups=(100, 2000))
    ident = authn.authenticate(
        CallInfo("/hsu.kernel.v1.Kernel/Status", (), "p", "control", {}, creds)
    )
    assert ident == Identity(
        "uid:1000", "uid", (), {"uid": "1000", "gid": "100", "pid": "42", "groups": "100,2000"}
    )
    settings = PeercredSettings(
        grants=(
            PeerGrant(roles=("read",), uid=1000),
            PeerGrant(roles=("control",), gid=2000, units=("echo",)),
        )
    )
    authz = PeercredAuthorizer(settings, owner=4242)
    scale = "/hsu.kernel.v1.Kernel/Scale"
    assert authz.authorize(ident, "/hsu.kernel.v1.Kernel/Status", None) is Decision.ALLOW
    assert authz.authorize(ident, scale, "echo") is Decision.ALLOW  # through group 2000
    assert authz.authorize(ident, scale, "other") is Decision.ABSTAIN
    assert authz.missing_role(ident, scale, "other") == "control"
    owner = Identity("uid:4242", "uid", (), {"uid": "4242", "gid": "0"})
    assert authz.authorize(owner, "/hsu.core.v1.Core/Shutdown", None) is Decision.ALLOW
    root = Identity("uid:0", "uid", (), {"uid": "0", "gid": "0"})
    assert authz.authorize(root, "/x.Y/Z", None) is Decision.ALLOW
    # another kind of identity that claims a uid is not peercred's to judge
    forged = Identity("uid:0", "token", ("read",), {"uid": "0"})
    assert authz.authorize(forged, scale, None) is Decision.ABSTAIN
    with pytest.raises(HsuError, match="unknown role 'nope'"):
        PeercredAuthorizer(PeercredSettings(grants=(PeerGrant(roles=("nope",), uid=1),)))
