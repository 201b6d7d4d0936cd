"""TLS and mTLS on the kernel's servers, with certificates the test makes.

``kernel.tls`` puts TLS on the data plane (the gateway) and on a TCP control
plane; ``client_ca`` makes it mutual. Certificates are read again when their
files change: a rotated one is served to the next connection, no restart.
Clients: ``hsu.connect(tls=...)`` and the CLI's ``--ca/--cert/--key``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest

import hsu
from conftest import hsu_env, run_hsu
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.tls import TLSConfig, aio_channel

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from hsu_echo.v1 import echo_pb2, echo_pb2_grpc  # noqa: E402

ECHO = "hsu.echo.v1.Echo"
SPIFFE = "spiffe://example.org/hsu/echo"


# -- a small CA ------------------------------------------------------------------


@attrs.frozen
class Issued:
    """A certificate and key written as PEM files."""

    cert: Path
    key: Path
    serial: int


class CA:
    """A self-signed CA that issues server and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}.ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, cn: str, sans: list[Any], client: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.oid.ExtendedKeyUsageOID
        cert = (
            _builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
                self.cert.subject,
                key.public_key(),
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([usage.CLIENT_AUTH if client else usage.SERVER_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(
            self.folder / f"{name}.pem", self.folder / f"{name}.key", cert.serial_number
        )
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return issued

    def server(self, name: str = "kernel") -> Issued:
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        return self.issue(name, cn="kernel", sans=[loopback, x509.DNSName("localhost")])

    def client(self, name: str, uri: str | None = None, cn: str = "client") -> Issued:
        sans = [x509.UniformResourceIdentifier(uri)] if uri else [x509.DNSName(cn)]
        return self.issue(name, cn=cn, sans=sans, client=True)


def _builder(subject: Any, issuer: Any, public_key: Any) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )


def replace(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` the way a rotation does: a new file
    renamed over the old one."""
    tmp = dst.with_suffix(".new")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


# -- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA(tmp_path, "ca")
    return {"ca": ca, "server": ca.server(), "other": CA(tmp_path, "other")}


def deployment(tls: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    echo = {"command": [sys.executable, "-m", "hsu_echo"], "interfaces": [ECHO], "env": env or {}}
    return {"name": "tls", "kernel": {"tls": tls}, "units": {"echo": echo}}


def server_tls(pki: dict[str, Any], mutual: bool = False) -> dict[str, Any]:
    tls = {"cert": str(pki["server"].cert), "key": str(pki["server"].key)}
    if mutual:
        tls["client_ca"] = str(pki["ca"].path)
    return tls


async def echo(address: str, tls: TLSConfig | None, message: str = "hi") -> str:
    async with aio_channel(address, tls) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(
            echo_pb2.EchoRequest(message=message), timeout=15
        )
    return str(reply.message)


async def refused(address: str, tls: TLSConfig | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await echo(address, tls)
    return info.value.code()


def peer_serial(address: str, ca: Path) -> int:
    """The serial of the certificate the server at ``address`` presents to a
    new connection (the ``ssl`` module's own handshake)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


# -- the data plane -----------------------------------------------------------------


async def test_the_data_plane_serves_tls_and_refuses_plaintext(hsu_kernel_factory, pki) -> None:
    kernel = await hsu_kernel_factory(deployment(server_tls(pki)))
    tls = TLSConfig(ca=str(pki["ca"].path))
    assert await echo(kernel.address, tls, "over tls") == "over tls"
    # a plaintext client, and one that trusts another CA, never get through
    assert await refused(kernel.address, None) == grpc.StatusCode.UNAVAILABLE
    assert await refused(kernel.address, TLSConfig(ca=str(pki["other"].path))) == (
        grpc.StatusCode.UNAVAILABLE
    )
    # the unix control socket stays plaintext (its 0600 mode guards it)
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        status = await kernel_pb2_grpc.KernelStub(ch).Status(kernel_pb2.StatusRequest())
    assert status.state == "running"


async def test_mtls_refuses_no_client_cert_and_one_from_another_ca(hsu_kernel_factory, pki) -> None:
    kernel = await hsu_kernel_factory(deployment(server_tls(pki, mutual=True)))
    ca = str(pki["ca"].path)
    good = pki["ca"].client("good", SPIFFE)
    stranger = pki["other"].client("stranger", SPIFFE)
    assert await echo(kernel.address, TLSConfig(ca, str(good.cert), str(good.key))) == "hi"
    assert await refused(kernel.address, TLSConfig(ca)) == grpc.StatusCode.UNAVAILABLE
    forged = TLSConfig(ca, str(stranger.cert), str(stranger.key))
    assert await refused(kernel.address, forged) == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_certificate_is_served_without_a_restart(
    hsu_kernel_factory, pki, tmp_path: Path
) -> None:
    live = Issued(tmp_path / "live.pem", tmp_path / "live.key", pki["server"].serial)
    replace(pki["server"].cert, live.cert)
    replace(pki["server"].key, live.key)
    kernel = await hsu_kernel_factory(deployment({"cert": str(live.cert), "key": str(live.key)}))
    ca = pki["ca"].path
    first = await asyncio.to_thread(peer_serial, kernel.address, ca)
    assert first == pki["server"].serial
    # a connection made before the rotation keeps working after it
    tls = TLSConfig(ca=str(ca))
    async with aio_channel(kernel.address, tls) as kept:
        stub = echo_pb2_grpc.EchoStub(kept)
        await stub.Echo(echo_pb2.EchoRequest(message="before"), timeout=15)
        new = pki["ca"].server("kernel-2")
        replace(new.key, live.key)  # half done: the old pair stays served
        assert await asyncio.to_thread(peer_serial, kernel.address, ca) == first
        replace(new.cert, live.cert)
        assert await asyncio.to_thread(peer_serial, kernel.address, ca) == new.serial
        reply = await stub.Echo(echo_pb2.EchoRequest(message="after"), timeout=15)
        assert reply.message == "after"
    assert kernel.state.value == "running"
    assert await echo(kernel.address, tls, "new connection") == "new connection"


async def test_tls_files_that_do_not_load_fail_the_start_in_one_line(
    hsu_kernel_factory, pki
) -> None:
    other = pki["ca"].server("unrelated")
    bad = {"cert": str(pki["server"].cert), "key": str(other.key)}
    with pytest.raises(hsu.HsuError) as info:
        await hsu_kernel_factory(deployment(bad))
    assert "do not load as a certificate and its key" in str(info.value)
    assert "\n" not in str(info.value)


# -- a TCP control plane: hsu.connect and the CLI --------------------------------------


async def test_cli_and_connect_with_client_certificates_on_a_tcp_control_plane(
    hsu_kernel_factory, pki
) -> None:
    ca = str(pki["ca"].path)
    me = pki["ca"].client("cli", "spiffe://example.org/hsu/cli")
    # the HSU registers over the same control plane: the SDK reads HSU_TLS_*
    unit = pki["ca"].client("unit", SPIFFE)
    env = {"HSU_TLS_CA": ca, "HSU_TLS_CERT": str(unit.cert), "HSU_TLS_KEY": str(unit.key)}
    kernel = await hsu_kernel_factory(
        deployment(server_tls(pki, mutual=True), env), control="127.0.0.1:0"
    )
    control = kernel.control_address
    tls_args = ["--ca", ca, "--cert", str(me.cert), "--key", str(me.key)]
    ok = await asyncio.to_thread(run_hsu, "status", "--control", control, "--json", *tls_args)
    assert ok.returncode == 0, ok.stderr
    assert '"state": "running"' in ok.stdout
    # the same through the environment
    env = hsu_env(HSU_TLS_CA=ca, HSU_TLS_CERT=str(me.cert), HSU_TLS_KEY=str(me.key))
    by_env = await asyncio.to_thread(run_hsu, "ping", "--control", control, env=env)
    assert by_env.returncode == 0, by_env.stderr
    # without a client certificate, or in plaintext: no kernel answers
    for args in (["--ca", ca], []):
        no = await asyncio.to_thread(run_hsu, "status", "--control", control, *args)
        assert no.returncode == 5  # the kernel is unreachable (docs/cli.md)
        assert "no kernel answers" in no.stderr
    # hsu.connect resolves over the mTLS control plane
    tls = TLSConfig(ca, str(me.cert), str(me.key))
    async with hsu.connect(control, tls=tls) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = await stub.Echo(echo_pb2.EchoRequest(message="routed"), timeout=15)
    assert reply.message == "routed"


# -- the mtls authenticator ------------------------------------------------------------


async def test_a_client_certificates_spiffe_id_is_the_callers_identity(
    hsu_kernel_factory, pki
) -> None:
    raw = deployment(server_tls(pki, mutual=True))
    raw["auth"] = {"authenticators": ["mtls"], "authorizers": ["rbac"]}
    raw["mtls"] = {"trust_domain": "example.org"}
    raw["rbac"] = {"grants": [{"identity": "spiffe://example.org/hsu/cli", "roles": ["read"]}]}
    kernel = await hsu_kernel_factory(raw, control="127.0.0.1:0")
    ca = str(pki["ca"].path)

    async def ask(issued: Issued, call: str) -> grpc.aio.AioRpcError | None:
        async with aio_channel(kernel.control_address, TLSConfig(ca, *_pair(issued))) as ch:
            stub = kernel_pb2_grpc.KernelStub(ch)
            try:
                if call == "Status":
                    await stub.Status(kernel_pb2.StatusRequest(), timeout=5)
                else:
                    await stub.Scale(kernel_pb2.ScaleRequest(unit="echo", count=2), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc
        return None

    cli = pki["ca"].client("cli", "spiffe://example.org/hsu/cli")
    assert await ask(cli, "Status") is None  # granted read by its SPIFFE ID
    denied = await ask(cli, "Scale")
    assert denied is not None and denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://example.org/hsu/cli" in (denied.details() or "")
    assert "control" in (denied.details() or "")
    # a SPIFFE ID of another trust domain, signed by the same CA: refused
    foreign = await ask(pki["ca"].client("foreign", "spiffe://other.org/hsu/cli"), "Status")
    assert foreign is not None and foreign.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "trust domain" in (foreign.details() or "")
    # without a URI SAN the subject's CN names the caller (granted nothing here)
    ops = await ask(pki["ca"].client("ops", cn="ops"), "Status")
    assert ops is not None and ops.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ops may not call" in (ops.details() or "")


def _pair(issued: Issued) -> tuple[str, str]:
    return str(issued.cert), str(issued.key)
