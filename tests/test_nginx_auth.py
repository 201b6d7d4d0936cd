"""Auth through the nginx data plane: nginx asks the kernel (auth_request)
before it forwards a call to an instance, and the refusal comes back as the
gRPC status the kernel's own gateway gives."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_gateway_nginx import ECHO, PLUGIN, free_port, needs_nginx, plane_of

from conftest import until
from hsu.testing import build_kernel
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.gateway.nginx_auth import _metadata, grpc_message

pytestmark = pytest.mark.integration

WHOAMI = str(Path(__file__).with_name("hsu_whoami.py"))
CALLER, READER = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


def bearer(token: str, *more: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), *more)


async def start(tmp_path: Path, address: str):
    kernel = build_kernel(
        {
            "auth": {"authenticators": ["token"], "authorizers": ["rbac"]},
            "token": {
                "tokens": [
                    {"identity": "alice", "token": CALLER, "roles": ["caller"]},
                    {"identity": "reader", "token": READER, "roles": ["read"]},
                ]
            },
            "rbac": {"roles": {"caller": [f"{ECHO}/*"]}},
            "gateway_nginx": {"address": address},
            "units": {
                "echo": {
                    "command": [sys.executable, WHOAMI],
                    "interfaces": [ECHO],
                    "start": "at-start",
                    "startup_timeout": 20,
                }
            },
        },
        names=[PLUGIN],
        base_dir=str(tmp_path),
    )
    await kernel.start()
    return kernel, plane_of(kernel)


async def echo(address: str, metadata) -> echo_pb2.EchoResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        reply: echo_pb2.EchoResponse = await echo_pb2_grpc.EchoStub(ch).Echo(
            echo_pb2.EchoRequest(message="hi"), metadata=metadata, timeout=10
        )
        return reply


async def refused(address: str, metadata) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await echo(address, metadata)
    return err.value


@needs_nginx
async def test_nginx_asks_the_kernel_before_it_forwards_a_call(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    kernel, plane = await start(tmp_path, address)
    try:
        await until(lambda: bool(plane.endpoints), 20)
        await until(lambda: plane.generation >= 2 or "server " in plane.render(), 20)
        conf = plane.render()
        assert "auth_request /_hsu_auth;" in conf and "grpc_pass grpc://hsu_unit_0" in conf

        anonymous = await refused(address, ())
        assert anonymous.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "no credentials" in (anonymous.details() or "")
        wrong = "x" * 30
        bad = await refused(address, bearer(wrong))
        assert bad.code() is grpc.StatusCode.UNAUTHENTICATED
        assert wrong not in (bad.details() or "")
        for _ in range(2):  # the second from nginx's cache of the kernel's answers
            denied = await refused(address, bearer(READER))
            assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
            assert f"/{ECHO}/Echo: reader may not call it" in (denied.details() or "")

        # allowed: straight to the instance, which sees neither the caller's
        # credential nor the identity header the caller forged
        for _ in range(2):
            reply = await echo(address, bearer(CALLER, ("hsu-identity", "forged.x")))
            seen = json.loads(reply.message)
            assert seen == {"identity": None, "headers": []}

        # health is open, as on the kernel's own data plane
        async with grpc.aio.insecure_channel(address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        # fail closed: with no answer from the kernel, nothing gets through
        assert plane.auth is not None
        await plane.auth.stop()
        for metadata in ((), bearer(CALLER)):
            down = await refused(address, metadata)
            assert down.code() is grpc.StatusCode.UNAVAILABLE
            assert "did not answer the auth check" in (down.details() or "")
    finally:
        await kernel.stop()
    assert plane.auth is not None and plane.auth.server is None  # stopped with nginx


def test_the_subrequest_is_read_as_the_call_it_stands_for():
    method, peer, metadata = _metadata(
        [
            b"Host: hsu_auth",
            b"X-Hsu-Method: /pkg.Svc/Do",
            b"X-Hsu-Peer: 127.0.0.1:5000",
            b"Authorization: Bearer abc",
            b"te: trailers",
            b"tenant-bin: AAE",
        ]
    )
    assert (method, peer) == ("/pkg.Svc/Do", "ipv4:127.0.0.1:5000")
    assert metadata == (("authorization", "Bearer abc"), ("tenant-bin", b"\x00\x01"))
    with pytest.raises(ValueError, match="not a gRPC method path"):
        _metadata([b"X-Hsu-Method: /_hsu_auth"])
    with pytest.raises(ValueError, match="not base64"):
        _metadata([b"X-Hsu-Method: /a.B/C", b"x-bin: ***"])
    assert grpc_message("café 100%\r\n") == "caf%C3%A9 100%25%0D%0A"
