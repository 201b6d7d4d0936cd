"""The control plane apart from the data plane, and closed to other users.

The Kernel API and the kernel's Core listen on a 0600 unix socket in the
0700 state dir; the data plane (the gateway) keeps its TCP loopback address
and never serves the Kernel API. The attacker is another local user: uid
65534 through ``setpriv``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import hsu
from conftest import hsu_env, run_hsu
from hsu._kernel import control
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

ECHO = "hsu.echo.v1.Echo"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def deployment(name: str = "ctl") -> dict:
    return {
        "name": name,
        "units": {
            "echo": {"command": [sys.executable, "-m", "hsu_echo"], "interfaces": [ECHO]},
        },
    }


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A deployment folder any user may enter: only the kernel's own modes
    stand between another user and its socket (pytest's tmp dirs are 0700).
    Ask for it before ``hsu_kernel_factory``, so that it is removed after the
    kernels have stopped (a stopping kernel still writes its state dir)."""
    path = Path(tempfile.mkdtemp(prefix="hsu-ctl-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


ATTACK = """
import sys, grpc
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.core.v1 import core_pb2, core_pb2_grpc
out = []
for address in sys.argv[1:]:
    with grpc.insecure_channel(address) as ch:
        calls = {
            "Status": lambda: kernel_pb2_grpc.KernelStub(ch).Status(
                kernel_pb2.StatusRequest(), timeout=3),
            "Scale": lambda: kernel_pb2_grpc.KernelStub(ch).Scale(
                kernel_pb2.ScaleRequest(unit="echo", count=3), timeout=3),
            "Shutdown": lambda: core_pb2_grpc.CoreStub(ch).Shutdown(
                core_pb2.ShutdownRequest(), timeout=3),
        }
        for name, call in calls.items():
            try:
                call()
                out.append(f"{address} {name} OK")
            except grpc.RpcError as exc:
                out.append(f"{address} {name} {exc.code().name}")
print("\\n".join(out))
"""


def attack(*addresses: str) -> dict[str, str]:
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-c", ATTACK, *addresses],
        capture_output=True,
        text=True,
        timeout=60,
        env=hsu_env(),
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    return {" ".join(line.split()[:2]): line.split()[2] for line in proc.stdout.splitlines()}


async def test_the_control_socket_is_private_whatever_the_umask(
    open_dir: Path, umask_000: None, hsu_kernel_factory
) -> None:
    kernel = await hsu_kernel_factory(deployment(), base_dir=str(open_dir))
    path = control.unix_path(kernel.control_address)
    assert path is not None and Path(path).parent == kernel.state_dir.absolute()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kernel.state_dir).st_mode) == 0o700
    # the owner gets in
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        status = await kernel_pb2_grpc.KernelStub(ch).Status(kernel_pb2.StatusRequest())
    assert status.state == "running"


async def test_another_user_reaches_no_control_rpc(
    open_dir: Path, umask_000: None, hsu_kernel_factory
) -> None:
    kernel = await hsu_kernel_factory(deployment(), base_dir=str(open_dir))
    await kernel.instance_for(ECHO)
    got = await asyncio.to_thread(attack, kernel.control_address, kernel.address)
    ctl, data = kernel.control_address, kernel.address
    # the socket refuses the connection itself
    for name in ("Status", "Scale", "Shutdown"):
        assert got[f"{ctl} {name}"] == "UNAVAILABLE", got
    # the data plane answers that user (it reached it) but serves no control RPC
    for name in ("Status", "Scale", "Shutdown"):
        assert got[f"{data} {name}"] == "UNIMPLEMENTED", got
    assert kernel.state is hsu.KernelState.RUNNING
    assert len(kernel.supervisor("echo").slots) == 1


async def test_the_data_plane_serves_units_and_health_not_the_kernel_api(
    hsu_kernel_factory,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

    kernel = await hsu_kernel_factory(deployment())
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="hi"))
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kernel_pb2_grpc.KernelStub(ch).ListInstances(kernel_pb2.ListInstancesRequest())
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await core_pb2_grpc.CoreStub(ch).Shutdown(core_pb2.ShutdownRequest())
    assert reply.message == "hi"
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert down.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert kernel.state is hsu.KernelState.RUNNING


async def test_without_a_gateway_there_is_no_data_plane(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment(), names=["no:gateway"])
    assert kernel.address == ""
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        status = await kernel_pb2_grpc.KernelStub(ch).Status(kernel_pb2.StatusRequest())
    assert status.state == "running"


@pytest.mark.parametrize("where", ["control", "address"])
def test_an_address_off_loopback_needs_insecure(where: str, tmp_path: Path) -> None:
    from hsu.testing import build_kernel

    settings = {where: "0.0.0.0:0"}
    listen = settings.get("address", "127.0.0.1:0")
    kernel = build_kernel(
        {**deployment(), "kernel": settings}, address=listen, base_dir=str(tmp_path)
    )
    with pytest.raises(hsu.HsuError, match=rf"kernel\.{where}: 0\.0\.0\.0:0 is reachable from"):
        kernel._check_exposure()
    allowed = build_kernel(
        {**deployment(), "kernel": {**settings, "insecure": True}},
        address=listen,
        base_dir=str(tmp_path),
    )
    allowed._check_exposure()  # a warning, not an error
    for loopback in ("127.0.0.1:0", "[::1]:0", "localhost:0", "unix:/x.sock"):
        assert control.is_loopback(loopback)
    assert not control.is_loopback("10.0.0.1:80")


async def test_a_second_kernel_of_the_same_deployment_does_not_steal_the_socket(
    hsu_kernel_factory, tmp_path: Path
) -> None:
    first = await hsu_kernel_factory(deployment())
    with pytest.raises(hsu.HsuError, match="another kernel listens there"):
        await hsu_kernel_factory(deployment())
    assert first.state is hsu.KernelState.RUNNING
    async with grpc.aio.insecure_channel(first.control_address) as ch:
        await core_pb2_grpc.CoreStub(ch).Ping(core_pb2.PingRequest())


async def test_a_state_dir_of_another_user_is_refused(hsu_kernel_factory, tmp_path: Path) -> None:
    state = tmp_path / ".hsu" / "ctl"
    state.mkdir(parents=True)
    os.chown(state, 65534, 65534)
    with pytest.raises(hsu.HsuError, match="owned by uid 65534"):
        await hsu_kernel_factory(deployment())


# -- finding the kernel -----------------------------------------------------


async def status_json(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`hsu status --json` in a thread: the kernel under test shares this loop."""
    return await asyncio.to_thread(run_hsu, "status", "--json", *args, env=env, timeout=30)


async def test_the_cli_finds_the_one_running_kernel(
    hsu_kernel_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv("HSU_RUNTIME_DIR", str(run))
    env = hsu_env(HSU_RUNTIME_DIR=str(run))
    none = await status_json(env=env)
    assert none.returncode != 0 and "no running kernel found" in none.stderr
    first = await hsu_kernel_factory(deployment("alpha"), base_dir=str(tmp_path / "a"))
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    found = await status_json(env=env)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["status"]["deployment"] == "alpha"
    await hsu_kernel_factory(deployment("beta"), base_dir=str(tmp_path / "b"))
    both = await status_json(env=env)
    assert both.returncode != 0
    assert "2 kernels run (alpha, beta): pick one with --kernel NAME" in both.stderr
    picked = await status_json("-k", "beta", env=env)
    assert json.loads(picked.stdout)["status"]["deployment"] == "beta"
    by_file = tmp_path / "a" / "alpha.yaml"
    by_file.write_text("name: alpha\nunits: {}\n")
    mine = await status_json("-d", str(by_file), env=env)
    assert json.loads(mine.stdout)["status"]["deployment"] == "alpha", mine.stderr
    await first.stop("test")
    # its entry went with it
    assert sorted(p.name for p in run.iterdir()) == ["beta.control"]


def test_a_runtime_dir_another_user_controls_is_not_trusted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o777)
    run.chmod(0o777)
    (run / "evil.control").write_text(f"unix:{tmp_path / 'evil.sock'}\n")
    env = hsu_env(HSU_RUNTIME_DIR=str(run))
    proc = run_hsu("status", "--json", env=env, timeout=30)
    assert proc.returncode != 0 and "no running kernel found" in proc.stderr
    with pytest.raises(hsu.HsuError, match="owned by uid 65534"):
        os.chown(run, 65534, 65534)
        control.secure_dir(run)


async def test_hsu_connect_finds_the_kernel_from_hsu_control(
    hsu_kernel_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

    kernel = await hsu_kernel_factory(deployment())
    monkeypatch.setenv("HSU_CONTROL", kernel.control_address)
    async with hsu.connect() as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="x"))
    assert reply.message == "x"


async def test_reloads_are_rate_limited(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment())
    codes = []
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        for _ in range(8):
            try:
                await stub.Reload(kernel_pb2.ReloadRequest(), timeout=10)
                codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code().name)
    # built from a dict, it has nothing to reload: refused, but counted
    assert codes[:5] == ["FAILED_PRECONDITION"] * 5
    assert "RESOURCE_EXHAUSTED" in codes[5:]
    assert kernel.state is hsu.KernelState.RUNNING


@pytest.mark.parametrize(
    ("key", "value"), [("control", "unix:/tmp/elsewhere.sock"), ("insecure", True)]
)
async def test_a_reload_that_moves_or_opens_the_control_plane_is_refused(
    hsu_kernel_factory, tmp_path: Path, key: str, value: object
) -> None:
    from hsu._kernel.config.model import deployment_from_dict

    kernel = await hsu_kernel_factory(deployment())
    moved = deployment_from_dict(
        {**deployment(), "kernel": {key: value}}, source="d.yaml", base_dir=str(tmp_path)
    )
    with pytest.raises(hsu.ConfigError, match=rf"kernel\.{key}: changed; it applies when"):
        await kernel.reload(moved)
    assert kernel.kernel_settings.control is None and not kernel.kernel_settings.insecure
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        await core_pb2_grpc.CoreStub(ch).Ping(core_pb2.PingRequest())


def test_a_flag_names_the_kernel_before_the_environment_does(tmp_path: Path) -> None:
    path = tmp_path / "alpha.yaml"
    path.write_text("name: alpha\nunits: {}\n")
    env = {"HSU_CONTROL": "unix:/elsewhere.sock", "HSU_KERNEL_ADDRESS": "unix:/other.sock"}
    mine = f"unix:{tmp_path.absolute() / '.hsu' / 'alpha' / 'control.sock'}"
    assert control.resolve(deployment=str(path), env=env) == mine
    assert control.resolve("unix:/given.sock", env=env) == "unix:/given.sock"
    assert control.resolve(env=env) == "unix:/elsewhere.sock"
