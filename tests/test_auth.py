"""Auth as a plugin family: who is calling, and what they may call.

Real kernels, real gRPC over loopback and the kernel's unix control socket.
The built-in ``token`` authenticator and ``rbac`` authorizer, stacked
authenticators from a test plugin, fail-closed plugins, the kernel's own
``instance`` authenticator (an HSU still registers), the caller's identity
forwarded to the HSU through the gateway (and a forged one dropped), and the
CLI's ``--token-file``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loguru import logger

import hsu
from conftest import hsu_env, run_hsu, write_deployment
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import ConfigError, Unauthenticated
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.ports import CallInfo, Decision, Identity
from hsu.testing import build_kernel
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = "hsu.echo.v1.Echo"
WHOAMI = str(Path(__file__).with_name("hsu_whoami.py"))
#: one token per holder, fresh for each run
ADMIN, READER, OPS, ALICE = (secrets.token_urlsafe(24) for _ in range(4))


def deployment(
    name: str = "auth",
    *,
    authenticators: tuple[str, ...] = ("token",),
    grants: list[dict[str, Any]] | None = None,
    command: list[str] | None = None,
    cache_ttl: float = 10.0,
) -> dict[str, Any]:
    return {
        "name": name,
        "auth": {
            "authenticators": list(authenticators),
            "authorizers": ["rbac"],
            "cache_ttl": cache_ttl,
        },
        "token": {
            "tokens": [
                {"identity": "admin", "token": ADMIN, "roles": ["read", "control", "admin"]},
                {"identity": "reader", "token": READER, "roles": ["read"]},
                {"identity": "ops", "token": OPS},
                {"identity": "alice", "token": ALICE, "roles": ["route", "caller"]},
            ]
        },
        "rbac": {"roles": {"caller": [f"{ECHO}/*"]}, "grants": grants or []},
        "units": {
            "echo": {
                "command": command or [sys.executable, "-m", "hsu_echo"],
                "interfaces": [ECHO],
            },
            "other": {"command": [sys.executable, "-m", "hsu_echo"], "interfaces": ["x.Other"]},
        },
    }


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def status(kernel: hsu.Kernel, metadata: Any = None) -> kernel_pb2.StatusResponse:
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        reply: kernel_pb2.StatusResponse = await kernel_pb2_grpc.KernelStub(ch).Status(
            kernel_pb2.StatusRequest(), metadata=metadata, timeout=10
        )
        return reply


async def scale(kernel: hsu.Kernel, unit: str, count: int, token: str) -> Any:
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        return await kernel_pb2_grpc.KernelStub(ch).Scale(
            kernel_pb2.ScaleRequest(unit=unit, count=count), metadata=bearer(token), timeout=30
        )


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_a_call_needs_a_known_token_and_health_stays_open(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment())
    anonymous = await refused(status(kernel))
    assert anonymous.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "no credentials" in (anonymous.details() or "")
    wrong = "x" * 30
    bad = await refused(status(kernel, bearer(wrong)))
    assert bad.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not known" in (bad.details() or "")
    assert wrong not in (bad.details() or "")
    assert (await status(kernel, bearer(ADMIN))).state == "running"
    # the data plane too: a routed call without a token gets nowhere near an HSU
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        routed = await refused(
            echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="hi"), timeout=10)
        )
        assert routed.code() is grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not any(i.alive for i in kernel.instances.values())


async def test_a_read_token_can_look_but_not_scale(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(deployment())
    assert (await status(kernel, bearer(READER))).state == "running"
    denied = await refused(scale(kernel, "echo", 1, READER))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    details = denied.details() or ""
    assert "/hsu.kernel.v1.Kernel/Scale" in details
    assert "reader" in details and "'control'" in details
    assert READER not in details
    assert not kernel.instances
    # Core of the kernel: Shutdown needs admin; Ping is read
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        core = core_pb2_grpc.CoreStub(ch)
        await core.Ping(core_pb2.PingRequest(), metadata=bearer(READER), timeout=5)
        stop = await refused(
            core.Shutdown(core_pb2.ShutdownRequest(), metadata=bearer(READER), timeout=5)
        )
    assert stop.code() is grpc.StatusCode.PERMISSION_DENIED and "'admin'" in (stop.details() or "")
    assert kernel.state is hsu.KernelState.RUNNING


async def test_control_granted_on_one_unit_only(hsu_kernel_factory) -> None:
    grants = [{"identity": "o*", "roles": ["control"], "units": ["echo"]}]
    kernel = await hsu_kernel_factory(deployment(grants=grants))
    reply = await scale(kernel, "echo", 1, OPS)
    assert [i.state for i in reply.instances] == ["ready"]
    denied = await refused(scale(kernel, "other", 1, OPS))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "unit 'other'" in (denied.details() or "")
    assert not [i for i in kernel.instances.values() if i.unit == "other"]


class Stacked:
    """Three authenticators: ``none`` never answers, ``header`` knows the
    caller by ``x-user``, ``never`` must not be asked after ``header`` answered;
    ``boom`` fails."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def _make(self, name: str, answer: Any) -> Any:
        stacked = self

        class One:
            metadata_keys = ("x-user",)

            def __init__(self, kernel: Any) -> None:
                pass

            def authenticate(self, call: CallInfo) -> Identity | None:
                stacked.asked.append(name)
                return answer(call)  # type: ignore[no-any-return]

        return One

    @hsu.hookimpl
    def hsu_register_authenticators(self, register: Any) -> None:
        def header(call: CallInfo) -> Identity | None:
            user = call.header("x-user")
            if user == "mallory":
                raise Unauthenticated("header: mallory is known and not welcome")
            return None if user is None else Identity(str(user), "header", ("read",))

        def boom(call: CallInfo) -> Identity | None:
            raise RuntimeError("the identity store is down")

        register("none", self._make("none", lambda call: None))
        register("header", self._make("header", header))
        register("never", self._make("never", lambda call: Identity("never", "x", ("read",))))
        register("boom", self._make("boom", boom))


async def test_authenticators_are_asked_in_the_deployments_order(hsu_kernel_factory) -> None:
    plugin = Stacked()
    raw = deployment(authenticators=("none", "header", "never"), cache_ttl=0)
    kernel = await hsu_kernel_factory(raw, plugins=[plugin])
    assert (await status(kernel, (("x-user", "bob"),))).state == "running"
    assert plugin.asked == ["none", "header"]
    plugin.asked.clear()
    # a rejection stops the chain: "never" would have let anyone in
    rejected = await refused(status(kernel, (("x-user", "mallory"),)))
    assert rejected.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "header: mallory is known" in (rejected.details() or "")
    assert plugin.asked == ["none", "header"]
    plugin.asked.clear()
    # nobody's credential: "never" answers last
    assert (await status(kernel)).state == "running"
    assert plugin.asked == ["none", "header", "never"]


class Veto:
    """An authorizer that denies every Scale and abstains on the rest."""

    @hsu.hookimpl
    def hsu_register_authorizers(self, register: Any) -> None:
        class Deny:
            def __init__(self, kernel: Any) -> None:
                pass

            def authorize(self, identity: Identity, method: str, unit: str | None) -> Decision:
                return Decision.DENY if method.endswith("/Scale") else Decision.ABSTAIN

        register("veto", Deny)


async def test_a_deny_wins_over_an_allow(hsu_kernel_factory) -> None:
    raw = deployment()
    raw["auth"]["authorizers"] = ["rbac", "veto"]
    kernel = await hsu_kernel_factory(raw, plugins=[Veto()])
    assert (await status(kernel, bearer(ADMIN))).state == "running"  # rbac allows, veto abstains
    denied = await refused(scale(kernel, "echo", 1, ADMIN))  # rbac allows, veto denies
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "denied by veto" in (denied.details() or "")
    assert not kernel.instances


async def test_an_identity_is_checked_once_per_connection_not_per_call(hsu_kernel_factory) -> None:
    plugin = Stacked()
    kernel = await hsu_kernel_factory(deployment(authenticators=("header",)), plugins=[plugin])
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stub = kernel_pb2_grpc.KernelStub(ch)
        for _ in range(10):
            await stub.Status(kernel_pb2.StatusRequest(), metadata=(("x-user", "bob"),))
        assert plugin.asked == ["header"]
        await stub.Status(kernel_pb2.StatusRequest(), metadata=(("x-user", "carol"),))
    assert plugin.asked == ["header", "header"]


async def test_a_failing_authenticator_refuses_and_is_logged_once(hsu_kernel_factory) -> None:
    plugin = Stacked()
    kernel = await hsu_kernel_factory(
        deployment(authenticators=("boom", "never"), cache_ttl=0), plugins=[plugin]
    )
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(m.record["message"]), level="ERROR")
    try:
        async with grpc.aio.insecure_channel(kernel.control_address) as ch:
            stub = kernel_pb2_grpc.KernelStub(ch)
            for _ in range(20):
                err = await refused(stub.Status(kernel_pb2.StatusRequest(), timeout=5))
                assert err.code() is grpc.StatusCode.UNAVAILABLE
                assert "'boom' failed" in (err.details() or "")
    finally:
        logger.remove(sink)
    assert plugin.asked == ["boom"] * 20  # never fell through to "never"
    assert len([m for m in logged if "the identity store is down" in m]) == 1


async def test_hsus_register_and_the_echo_demo_works_with_a_token(hsu_kernel_factory) -> None:
    raw = deployment()
    raw["units"]["echo"]["start"] = "at-start"
    kernel = await hsu_kernel_factory(raw)  # the start waited for echo's Register
    (echo,) = [i for i in kernel.instances.values() if i.unit == "echo"]
    assert echo.state.value == "ready"
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        reply = await stub.Echo(
            echo_pb2.EchoRequest(message="hi"), metadata=bearer(ALICE), timeout=10
        )
        assert reply.message == "hi"
        # alice may call Echo but holds no role on the Kernel API
        denied = await refused(status(kernel, bearer(ALICE)))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
        # reader may look at the kernel but not call Echo
        other = await refused(
            stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=bearer(READER), timeout=10)
        )
        assert other.code() is grpc.StatusCode.PERMISSION_DENIED
        assert f"/{ECHO}/Echo" in (other.details() or "")
        assert "'caller'" in (other.details() or "")
    # hsu.connect: Resolve and WatchEndpoints with alice's token (role route)
    async with hsu.connect(kernel.control_address, token=ALICE) as routed:
        reply = await echo_pb2_grpc.EchoStub(routed).Echo(echo_pb2.EchoRequest(message="yo"))
    assert reply.message == "yo"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with hsu.connect(kernel.control_address) as anonymous:
            await echo_pb2_grpc.EchoStub(anonymous).Echo(echo_pb2.EchoRequest(message="no"))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # an instance's own token is good for the handshake only, not to stop the kernel
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        stop = await refused(
            core_pb2_grpc.CoreStub(ch).Shutdown(
                core_pb2.ShutdownRequest(), metadata=(("hsu-instance-token", echo.token),)
            )
        )
    assert stop.code() is grpc.StatusCode.PERMISSION_DENIED
    assert f"instance:{echo.instance_id}" in (stop.details() or "")
    assert kernel.state is hsu.KernelState.RUNNING


async def test_the_callers_identity_reaches_the_hsu_and_a_forged_one_does_not(
    hsu_kernel_factory,
) -> None:
    kernel = await hsu_kernel_factory(deployment(command=[sys.executable, WHOAMI]))
    forged = "eyJuIjoiYWRtaW4ifQ.forged"
    metadata = (
        *bearer(ALICE),
        ("hsu-identity", forged),
        ("hsu-identity-extra", "also forged"),
    )
    async with grpc.aio.insecure_channel(kernel.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(
            echo_pb2.EchoRequest(message="who"), metadata=metadata, timeout=30
        )
    seen = json.loads(reply.message)
    assert seen["identity"] == {"name": "alice", "kind": "token", "roles": ["route", "caller"]}
    keys = [k for k, _ in seen["headers"]]
    assert keys == ["hsu-identity"]  # the kernel's own; no forgery, no bearer token
    assert seen["headers"][0][1] != forged
    # straight to the HSU, a forged header is not believed
    (inst,) = [i for i in kernel.instances.values() if i.unit == "echo"]
    async with grpc.aio.insecure_channel(inst.address) as direct:
        reply = await echo_pb2_grpc.EchoStub(direct).Echo(
            echo_pb2.EchoRequest(message="who"), metadata=metadata[1:], timeout=10
        )
    assert json.loads(reply.message)["identity"] is None


def test_a_signed_identity_is_good_for_its_instance_only() -> None:
    from hsu import identity

    who = Identity("alice", "token", ("read",), {"team": "a"})
    value = identity.sign(who, "secret-of-echo-1", "echo-1")
    assert identity.verify(value, "secret-of-echo-1", "echo-1") == who
    assert identity.verify(value, "secret-of-echo-1", "echo-2") is None
    assert identity.verify(value, "another-secret", "echo-1") is None
    payload, mac = value.split(".")
    assert identity.verify(f"{payload}x.{mac}", "secret-of-echo-1") is None
    stale = identity.sign(who, "k", "echo-1", now=0)
    assert identity.verify(stale, "k", "echo-1") is None


async def test_turning_auth_off_by_reload_is_refused(hsu_kernel_factory, tmp_path: Path) -> None:
    from hsu._kernel.config.model import deployment_from_dict

    kernel = await hsu_kernel_factory(deployment())
    off = deployment()
    off["auth"] = {}
    with pytest.raises(ConfigError, match="turning auth off applies when the kernel starts"):
        await kernel.reload(deployment_from_dict(off, source="<test>", base_dir=str(tmp_path)))
    unknown = deployment(authenticators=("token", "nope"))
    with pytest.raises(ConfigError, match="no authenticator named 'nope'"):
        await kernel.reload(deployment_from_dict(unknown, source="<test>", base_dir=str(tmp_path)))
    # a new token applies on reload
    more = deployment()
    fresh = secrets.token_urlsafe(24)
    more["token"]["tokens"].append({"identity": "new", "token": fresh, "roles": ["read"]})
    await kernel.reload(deployment_from_dict(more, source="<test>", base_dir=str(tmp_path)))
    assert (await status(kernel, bearer(fresh))).state == "running"


def test_with_auth_on_an_address_may_leave_the_machine(tmp_path: Path) -> None:
    raw = deployment()
    raw["kernel"] = {"control": "0.0.0.0:0"}
    build_kernel(raw, base_dir=str(tmp_path))._check_exposure()  # no error: auth is on
    raw["auth"] = {}
    with pytest.raises(hsu.HsuError, match="turn auth on"):
        build_kernel(raw, base_dir=str(tmp_path))._check_exposure()


async def test_the_cli_sends_the_token_file(kernel_process, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    path = write_deployment(
        tmp_path / "deploy.yaml",
        "name: cli-auth\n"
        "auth: {authenticators: [token], authorizers: [rbac]}\n"
        "token:\n"
        "  tokens:\n"
        "    - {identity: ops, token: '${env:OPS_TOKEN}', roles: [read, control]}\n"
        "units:\n"
        f"  echo: {{command: ['{sys.executable}', -m, hsu_echo], interfaces: [{ECHO}]}}\n",
    )
    kernel = kernel_process(path, hsu_env(OPS_TOKEN=token))
    await asyncio.to_thread(kernel.wait_ready)
    good = tmp_path / "ops.token"
    good.write_text(token + "\n")
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token-at-all\n")
    control = ["--control", kernel.address]
    ok = await asyncio.to_thread(run_hsu, "status", *control, "--token-file", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "cli-auth" in ok.stdout
    via_env = await asyncio.to_thread(
        run_hsu, "scale", "echo", "1", *control, env=hsu_env(HSU_TOKEN_FILE=str(good))
    )
    assert via_env.returncode == 0, via_env.stderr
    for args in ([], ["--token-file", str(bad)]):
        no = await asyncio.to_thread(run_hsu, "status", *control, *args)
        assert no.returncode != 0
        assert "UNAUTHENTICATED" in no.stderr
        assert "not-the-token" not in no.stderr
    missing = await asyncio.to_thread(
        run_hsu, "status", *control, "--token-file", str(tmp_path / "nope")
    )
    assert missing.returncode != 0 and "cannot read" in missing.stderr
