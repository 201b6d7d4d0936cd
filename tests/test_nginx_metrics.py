"""The nginx data plane tells the kernel of each call it routes
(plugins/hsu_plugins/gateway/nginx_calls.py): counted under
go-grpc-prometheus's names as the Python gateway's calls are, and told to
``hsu_routed_call``. A real nginx, a real echo HSU, real gRPC on loopback;
.ci/run sets HSU_REQUIRE_NGINX=1, so these never skip there.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import urllib.error
import urllib.request
from typing import Any

import grpc
import psutil
import pytest

import hsu
from conftest import until
from hsu.ports import RoutedCall
from hsu.testing import build_kernel
from hsu.tracecontext import SpanContext
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc
from hsu_plugins.gateway import nginx as gateway_nginx
from hsu_plugins.gateway import nginx_calls
from hsu_plugins.gateway.nginx_calls import Dropped, parse

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.environ.get("HSU_REQUIRE_NGINX"),
    reason="nginx is not installed (apt-get install nginx-light)",
)

ECHO = "hsu.echo.v1.Echo"
PLUGIN = "hsu_plugins.gateway.nginx"
UNIT = {
    "command": ["python", "-m", "hsu_echo"],
    "interfaces": [ECHO],
    "start": "at-start",
    "startup_timeout": 20,
    "stop_grace": 5,
}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(page: str, name: str, **labels: str) -> float | None:
    """The sum of the kernel's own lines of ``name`` (not an HSU's, collected
    over Core: those have ``hsu_instance``) whose labels include ``labels``."""
    found = None
    for line in page.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if "hsu_instance=" in head:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            found = (found or 0.0) + float(value)
    return found


def counted(kernel: Any, name: str = "grpc_server_handled_total", **labels: str) -> float:
    """What the kernel's own registry holds for ``name`` (points with ``labels``)."""
    total = 0.0
    for fam in kernel.metrics.collect():
        if fam.name != name:
            continue
        for p in fam.points:
            if labels.items() <= dict(p.labels).items():
                total += p.count if fam.kind == "histogram" else p.value
    return total


async def start(tmp_path: Any, raw: dict[str, Any], plugins: Any = ()) -> Any:
    kernel = build_kernel(
        {"units": {"echo": UNIT}, **raw}, names=[PLUGIN], plugins=plugins, base_dir=str(tmp_path)
    )
    await kernel.start()
    plane = kernel.plugin(gateway_nginx.PLANE)
    assert isinstance(plane, gateway_nginx.DataPlane)
    return kernel, plane


async def routed_by_nginx(kernel: Any, plane: Any) -> None:
    """Until nginx routes Echo straight to the instance (and its kinds are known)."""
    await until(lambda: bool(plane.endpoints))
    assert await plane._until_serving(plane.generation, 10)
    await until(lambda: f"/{ECHO}/Echo" in plane.calls.kinds)


@needs_nginx
async def test_calls_through_nginx_are_counted_and_told_to_plugins(tmp_path: Any) -> None:
    told: list[RoutedCall] = []

    class Tracer:
        @staticmethod
        @hsu.hookimpl
        def hsu_routed_call(kernel: Any, call: RoutedCall) -> None:
            told.append(call)

    kernel, plane = await start(
        tmp_path,
        {"kernel": {"exporters": ["prometheus"]}, "prometheus": {"address": "127.0.0.1:0"}},
        plugins=[Tracer],
    )
    n = 12
    caller = SpanContext.new()
    try:
        await routed_by_nginx(kernel, plane)
        through = dict(kernel.routing.through)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            for i in range(n - 1):
                await echo.Echo(echo_pb2.EchoRequest(message=str(i)), timeout=10)
            await echo.Echo(
                echo_pb2.EchoRequest(message="t"), timeout=10, metadata=caller.metadata()
            )
            streamed = echo.EchoStream(echo_pb2.EchoStreamRequest(message="s", count=2))
            assert [r.message async for r in streamed] == ["s 0", "s 1"]
            # the instance answers UNIMPLEMENTED itself (trailers only)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{ECHO}/Nope")(b"", timeout=10)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            # what no unit serves is nginx's own answer: no routed call
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/nope.v1.Nope/Call")(b"", timeout=10)
        assert kernel.routing.through == through  # none of them went through the kernel
        await until(lambda: len(told) >= n + 2)
        await asyncio.sleep(0.2)  # nothing more comes
        assert len(told) == n + 2

        # counted in the kernel's registry and on the prometheus exporter's page
        assert counted(kernel, grpc_method="Echo", grpc_code="OK", grpc_type="unary") == n
        assert counted(kernel, "grpc_server_handling_seconds", grpc_method="Echo") == n
        assert counted(kernel, grpc_method="EchoStream", grpc_type="server_stream") == 1
        assert counted(kernel, grpc_method="Nope", grpc_code="UNIMPLEMENTED") == 1
        assert counted(kernel, grpc_service="nope.v1.Nope") == 0
        exporter = next(e for name, e in kernel.metrics_hub._exporters if name == "prometheus")
        status, page = await asyncio.to_thread(_get, f"http://{exporter.address}/metrics")
        assert status == 200
        labels = {"grpc_service": ECHO, "grpc_method": "Echo", "hsu_unit": "echo"}
        assert _sample(page, "grpc_server_handled_total", grpc_code="OK", **labels) == n
        assert _sample(page, "grpc_server_handled_total", grpc_method="Nope") == 1
        assert _sample(page, "hsu_nginx_call_log_lost_total") == 0

        # the plugin was told of each: method, unit, code, times
        by_method = [c.method for c in told]
        assert by_method.count(f"/{ECHO}/Echo") == n
        nope = next(c for c in told if c.method.endswith("/Nope"))
        assert nope.code == "UNIMPLEMENTED" and nope.unit == "echo"
        for call in told:
            assert call.unit == "echo" and 0 <= call.end_ns - call.start_ns < 10 * 10**9
        # a traced call: the kernel's span of it, made after the fact, is a
        # child of the caller's; the others have none
        traced = [c for c in told if c.span is not None]
        assert len(traced) == 1
        span = traced[0].span
        assert span is not None
        assert span.trace_id == caller.trace_id and span.parent_id == caller.span_id
        assert span.span_id != caller.span_id
    finally:
        await kernel.stop()


@needs_nginx
async def test_a_bad_datagram_is_dropped_counted_and_the_kernel_keeps_counting(
    tmp_path: Any,
) -> None:
    kernel, plane = await start(tmp_path, {})
    try:
        await routed_by_nginx(kernel, plane)
        calls = plane.calls
        host, port = calls.address.split(":")
        good = {
            "method": f"/{ECHO}/Echo",
            "unit": "echo",
            "status": "200",
            "trailer": "0",
            "took": "0.001",
            "end": "1700000000.5",
        }
        bad = [
            b"not a line at all",
            b"<190>Dec  2 05:19:12 hsu: " + calls.token.encode() + b"\ttoo\tfew",
            b"\t" * 10_000,  # oversized
            b"\xff\xfe" + encode(calls.token, **good)[2:],  # not UTF-8
            encode("0" * 32, **good),  # forged: no token
            encode(calls.token, **{**good, "method": "../etc"}),
            encode(calls.token, **{**good, "unit": "other"}),
            encode(calls.token, **{**good, "trailer": "99"}),
            encode(calls.token, **{**good, "end": "-1"}),
            b"{" * 60_000,  # oversized
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data in bad:
                sock.sendto(data, (host, int(port)))
        dropped = "hsu_nginx_call_log_dropped_total"
        await until(lambda: counted(kernel, dropped) == len(bad))
        assert counted(kernel, dropped, reason="oversized") == 2
        assert counted(kernel, dropped, reason="token") == 1
        assert counted(kernel, dropped, reason="malformed") == len(bad) - 3
        assert counted(kernel) == 0  # none was counted as a call
        # and the calls nginx routes go on being counted, after a reload too
        async with grpc.aio.insecure_channel(plane.address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            await echo.Echo(echo_pb2.EchoRequest(message="after"), timeout=10)
            await until(lambda: counted(kernel, grpc_method="Echo") == 1)
            generation = plane.generation
            plane.reload()
            assert await plane._until_serving(generation + 1, 10)
            for _ in range(3):
                await echo.Echo(echo_pb2.EchoRequest(message="reloaded"), timeout=10)
            await until(lambda: counted(kernel, grpc_method="Echo") == 4)
    finally:
        await kernel.stop()
    # the socket is closed with the kernel: its port is free again
    assert plane.calls.sock is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, int(port)))


@needs_nginx
async def test_a_call_nginx_could_not_deliver_is_counted_unavailable(tmp_path: Any) -> None:
    """nginx's own error page (the instance is gone) is a named location: the
    call keeps its unit, and is counted with the code its client saw."""
    unit = {**UNIT, "restart": {"policy": "never"}}
    # nginx keeps the dead instance's address: the reload is far off
    kernel, plane = await start(
        tmp_path, {"units": {"echo": unit}, "gateway_nginx": {"reload_delay": 60}}
    )
    try:
        await routed_by_nginx(kernel, plane)
        [inst] = kernel.instances.values()
        async with grpc.aio.insecure_channel(plane.address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            await echo.Echo(echo_pb2.EchoRequest(message="alive"), timeout=10)
            os.kill(inst.pid, signal.SIGKILL)
            await until(lambda: not psutil.pid_exists(inst.pid) or _zombie(inst.pid))
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await echo.Echo(echo_pb2.EchoRequest(message="gone"), timeout=10)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "instance unavailable" in (info.value.details() or "")
        await until(lambda: counted(kernel, grpc_method="Echo") == 3)
        assert counted(kernel, grpc_code="UNAVAILABLE", hsu_unit="echo") == 2
        assert counted(kernel, grpc_code="OK", hsu_unit="echo") == 1
    finally:
        await kernel.stop()


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@needs_nginx
async def test_a_call_auth_refused_is_not_counted(tmp_path: Any) -> None:
    """nginx answered it without trying an instance: not routed, as with the
    Python gateway, whose auth refuses before it routes."""
    token = secrets.token_urlsafe(24)
    kernel, plane = await start(
        tmp_path,
        {
            "auth": {"authenticators": ["token"], "authorizers": ["rbac"]},
            "token": {"tokens": [{"identity": "alice", "token": token, "roles": ["caller"]}]},
            "rbac": {"roles": {"caller": [f"{ECHO}/*"]}},
        },
    )
    try:
        await routed_by_nginx(kernel, plane)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo.Echo(echo_pb2.EchoRequest(message="who?"), timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            metadata = (("authorization", f"Bearer {token}"),)
            await echo.Echo(echo_pb2.EchoRequest(message="alice"), timeout=10, metadata=metadata)
        # lines arrive in order: once the second call is counted, the first
        # would have been
        await until(lambda: counted(kernel, grpc_method="Echo", grpc_code="OK") == 1)
        assert counted(kernel) == 1
    finally:
        await kernel.stop()


@needs_nginx
async def test_a_unit_named_0_is_counted(tmp_path: Any) -> None:
    """access_log's if= takes "0" for false: the condition is not the unit's name."""
    kernel, plane = await start(tmp_path, {"units": {"0": UNIT}})
    try:
        await routed_by_nginx(kernel, plane)
        async with grpc.aio.insecure_channel(plane.address) as channel:
            echo = echo_pb2_grpc.EchoStub(channel)
            for _ in range(2):
                await echo.Echo(echo_pb2.EchoRequest(message="zero"), timeout=10)
        await until(lambda: counted(kernel, grpc_method="Echo", hsu_unit="0") == 2)
    finally:
        await kernel.stop()


@needs_nginx
@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ({"gateway_nginx": {"call_log": False}}, False),
        ({"kernel": {"metrics": False}}, False),  # nothing to count, no plugin told
        ({}, True),
    ],
    ids=["call_log-off", "metrics-off", "on"],
)
async def test_nginx_logs_calls_only_when_someone_counts_them(
    tmp_path: Any, raw: dict[str, Any], logged: bool
) -> None:
    kernel, plane = await start(tmp_path, raw)
    try:
        await until(lambda: bool(plane.endpoints))
        assert await plane._until_serving(plane.generation, 10)
        conf = plane.conf.read_text()
        assert ("access_log syslog:server=127.0.0.1:" in conf) is logged
        assert (plane.calls is not None) is logged
        # the kernel's own locations are never logged: its gateway counts those
        kernel_locations = [line for line in conf.splitlines() if "grpc://hsu_kernel" in line]
        assert kernel_locations and not any("hsu_unit" in line for line in kernel_locations)
    finally:
        await kernel.stop()


# -- the line's parser (no nginx needed) -------------------------------------------

TOKEN = "ab" * 16


def encode(token: str, **fields: str) -> bytes:
    """A line as nginx sends it (syslog's header, the token, the fields)."""
    values = [fields.get(name, "") for name, _ in nginx_calls.FIELDS]
    return "\t".join([f"<190>Dec  2 05:19:12 hsu: {token}", *values]).encode()


def line(**fields: str) -> bytes:
    base = {"method": f"/{ECHO}/Echo", "unit": "echo", "status": "200"}
    base.update({"took": "0.250", "end": "1700000000.750"}, **fields)
    return encode(TOKEN, **base)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"trailer": "0"}, "OK"),  # in the trailers
        ({"header": "12"}, "UNIMPLEMENTED"),  # trailers-only
        ({"sent": "14", "status": "204"}, "UNAVAILABLE"),  # nginx's own error page
        ({"status": "499"}, "CANCELLED"),  # the client went away
        ({"status": "200"}, "UNKNOWN"),  # no grpc-status at all
        ({"trailer": "0, 4"}, "DEADLINE_EXCEEDED"),  # tried twice: the last try counts
    ],
)
def test_the_code_is_read_from_trailers_headers_or_the_http_status(
    fields: dict[str, str], code: str
) -> None:
    got = parse(line(**fields), TOKEN, {"echo"})
    assert got.code == code
    assert got.end_ns == 1_700_000_000_750_000_000
    assert got.end_ns - got.start_ns == 250_000_000


def test_the_last_upstream_tried_is_the_instance() -> None:
    got = parse(line(address="127.0.0.1:1, 127.0.0.1:2 : unix:/x.sock"), TOKEN, {"echo"})
    assert got.address == "unix:/x.sock"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode("cd" * 16, method=f"/{ECHO}/Echo", unit="echo", status="200"), "token"),
        (line(method="/a.B/c/d"), "malformed"),
        (line(status="x"), "malformed"),
        (line(took="1e9"), "malformed"),
        (line(trailer="-1"), "malformed"),
        (line(unit=""), "malformed"),
        (line(end="1.2.3"), "malformed"),
        (line(status="²"), "malformed"),  # a digit to str.isdigit, not to int
        (line(trailer="1²"), "malformed"),
        (line(end="1²"), "malformed"),
        (line() + b"\textra", "malformed"),
        (b"\t" * (nginx_calls.MAX_LINE + 1), "oversized"),
        (b"no tabs", "malformed"),
        (b"\xff\xfe\t" * 11, "malformed"),
    ],
)
def test_a_line_that_tells_no_call_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Dropped) as info:
        parse(data, TOKEN, {"echo"})
    assert info.value.reason == reason


def test_the_log_format_is_json_escaped_and_takes_only_a_hex_token() -> None:
    fmt = nginx_calls.log_format(TOKEN)
    assert "escape=json" in fmt and "$upstream_trailer_grpc_status" in fmt and TOKEN in fmt
    assert fmt.count("\t") == len(nginx_calls.FIELDS)
    with pytest.raises(ValueError, match="hex"):
        nginx_calls.log_format("x'; evil")
