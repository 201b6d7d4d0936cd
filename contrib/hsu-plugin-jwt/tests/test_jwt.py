"""The ``jwt`` authenticator, with keys the test makes and a JWKS served over
loopback HTTP by the test: valid tokens, refused ones (expired, another
issuer or audience, a bad signature), key rotation by ``kid`` with a rate
limit, and a real kernel refusing and admitting calls through its gateway."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from hsu.errors import Unauthenticated
from hsu.ports import CallInfo, Decision, Identity

jwt = pytest.importorskip("jwt")
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from hsu_plugin_jwt import STATE, JwtAuthenticator, JwtSettings, KernelKeys, KeySet  # noqa: E402

from hsu_echo.v1 import echo_pb2, echo_pb2_grpc  # noqa: E402

ISSUER = "https://idp.test/"
AUDIENCE = "hsu"
ECHO = "hsu.echo.v1.Echo"


class Issuer:
    """Signing keys by ``kid`` (ES256), the JWKS that publishes them, tokens."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}

    def add_key(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())

    def jwks(self, *kids: str) -> dict[str, Any]:
        out = []
        for kid in kids or tuple(self.keys):
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.keys[kid].public_key()))
            out.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
        return {"keys": out}

    def token(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300, "iat": now}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return str(jwt.encode(body, self.keys[kid], algorithm="ES256", headers={"kid": kid}))


class JwksServer:
    """A JWKS document over HTTP on loopback; counts the fetches."""

    def __init__(self, document: dict[str, Any]):
        self.document = document
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def issuer() -> Issuer:
    found = Issuer()
    found.add_key("k1")
    return found


@pytest.fixture
def jwks_server(issuer: Issuer) -> Iterator[JwksServer]:
    server = JwksServer(issuer.jwks("k1"))
    try:
        yield server
    finally:
        server.close()


def settings(**kw: Any) -> JwtSettings:
    base: dict[str, Any] = {"issuer": ISSUER, "audience": (AUDIENCE,), "algorithms": ("ES256",)}
    return JwtSettings(**{**base, **kw})


def authenticator(s: JwtSettings, base_dir: Path | str = ".") -> JwtAuthenticator:
    keys = KeySet(s, base_dir)
    keys.load()
    return JwtAuthenticator(s, keys)


def call(token: str | None) -> CallInfo:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    return CallInfo("/hsu.echo.v1.Echo/Echo", metadata, "ipv4:127.0.0.1:1", "data")


def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` (blocking) until it holds or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def write_jwks(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


# -- the authenticator ----------------------------------------------------------------


def test_a_valid_token_names_its_subject_and_roles(issuer: Issuer, tmp_path: Path) -> None:
    write_jwks(tmp_path / "jwks.json", issuer.jwks())
    auth = authenticator(settings(jwks_file="jwks.json"), tmp_path)
    found = auth.authenticate(call(issuer.token("k1", roles=["read", "control"])))
    assert found == Identity("alice", "jwt", ("read", "control"), found.attributes if found else {})
    assert found is not None and found.attributes["iss"] == ISSUER
    # roles from a dotted path, and from a space separated string (scope)
    nested = authenticator(settings(jwks_file="jwks.json", roles_claim="realm.roles"), tmp_path)
    got = nested.authenticate(call(issuer.token("k1", realm={"roles": ["admin"]})))
    assert got is not None and got.roles == ("admin",)
    scoped = authenticator(settings(jwks_file="jwks.json", roles_claim="scope"), tmp_path)
    got = scoped.authenticate(call(issuer.token("k1", scope="read control")))
    assert got is not None and got.roles == ("read", "control")


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"iss": "https://other.test/"}, "not from the configured issuer"),
        ({"aud": "someone-else"}, "not for this audience"),
        ({"exp": None}, 'Token is missing the "exp" claim'),
    ],
)
def test_expired_and_foreign_tokens_are_refused(
    issuer: Issuer, tmp_path: Path, claims: dict[str, Any], why: str
) -> None:
    write_jwks(tmp_path / "jwks.json", issuer.jwks())
    auth = authenticator(settings(jwks_file="jwks.json", leeway=0), tmp_path)
    with pytest.raises(Unauthenticated, match=why):
        auth.authenticate(call(issuer.token("k1", **claims)))


def test_a_signature_by_another_key_under_a_known_kid_is_refused(
    issuer: Issuer, tmp_path: Path
) -> None:
    write_jwks(tmp_path / "jwks.json", issuer.jwks())
    auth = authenticator(settings(jwks_file="jwks.json"), tmp_path)
    issuer.add_key("k1")  # a new key, the old kid: the published key does not verify it
    with pytest.raises(Unauthenticated, match="does not verify"):
        auth.authenticate(call(issuer.token("k1")))


def test_other_bearer_tokens_and_no_header_are_not_mine(issuer: Issuer, tmp_path: Path) -> None:
    write_jwks(tmp_path / "jwks.json", issuer.jwks())
    auth = authenticator(settings(jwks_file="jwks.json"), tmp_path)
    assert auth.authenticate(call(None)) is None
    assert auth.authenticate(call("an-opaque-token-of-the-token-plugin")) is None
    assert auth.authenticate(call("a.b.c")) is None


def test_an_unknown_kid_rereads_a_jwks_file_once_per_cooldown(
    issuer: Issuer, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, issuer.jwks("k1"))
    auth = authenticator(settings(jwks_file="jwks.json", refetch_cooldown=30), tmp_path)
    assert auth.keys.reads == 1
    issuer.add_key("k2")
    write_jwks(path, issuer.jwks("k1", "k2"))  # rotation: the new key is published
    found = auth.authenticate(call(issuer.token("k2", sub="bob")))
    assert found is not None and found.name == "bob"
    assert auth.keys.reads == 2
    # made-up kids: refused, and the file is not read again within the cooldown
    for n in range(20):
        with pytest.raises(Unauthenticated, match="no signing key"):
            auth.authenticate(call(_kid(n)))
    assert auth.keys.reads == 2


def _kid(n: int) -> str:
    """A token whose header names kid ``made-up-N`` (signed by nobody)."""
    header = jwt.utils.base64url_encode(
        json.dumps({"alg": "ES256", "kid": f"made-up-{n}"}).encode()
    )
    return f"{header.decode()}.e30.c2ln"


def test_an_unknown_kid_refetches_the_jwks_url_on_a_thread(
    issuer: Issuer, jwks_server: JwksServer
) -> None:
    auth = authenticator(settings(jwks_url=jwks_server.url, refetch_cooldown=30))
    assert jwks_server.hits == 1
    assert auth.authenticate(call(issuer.token("k1"))) is not None
    issuer.add_key("k2")
    jwks_server.document = issuer.jwks("k1", "k2")
    token = issuer.token("k2", sub="carol")
    # the call that finds the new kid is refused: the fetch runs off the caller's thread
    with pytest.raises(Unauthenticated, match="retry"):
        auth.authenticate(call(token))
    assert until(lambda: auth.keys.reads >= 2)
    found = auth.authenticate(call(token))
    assert found is not None and found.name == "carol"
    assert jwks_server.hits == 2
    for n in range(20):
        with pytest.raises(Unauthenticated):
            auth.authenticate(call(_kid(n)))
    time.sleep(0.2)
    assert jwks_server.hits == 2  # within the cooldown: no fetch for made-up kids


def test_settings_refuse_shared_secret_algorithms_and_need_issuer_and_audience() -> None:
    with pytest.raises(ValueError, match="HS256 cannot verify"):
        JwtSettings(algorithms=("ES256", "HS256"))
    assert JwtSettings().problems() == [
        "jwt: give one of jwks_file or jwks_url (where the signing keys are)",
        "jwt.issuer: required (the iss a token must carry)",
        "jwt.audience: required (the aud a token must carry)",
    ]


# -- a kernel with jwt on its gateway --------------------------------------------------


class Recorder:
    """An authorizer plugin that allows every call and records who made it."""

    def __init__(self) -> None:
        self.seen: list[Identity] = []

    def authorize(self, identity: Identity, method: str, unit: str | None) -> Decision:
        self.seen.append(identity)
        return Decision.ALLOW

    @hsu.hookimpl
    def hsu_register_authorizers(self, register: Any) -> None:
        register("recorder", lambda kernel: self)


async def test_a_kernel_admits_a_valid_jwt_and_refuses_an_expired_one(
    hsu_kernel_factory: Any, issuer: Issuer, jwks_server: JwksServer
) -> None:
    recorder = Recorder()
    raw = {
        "name": "jwt",
        "auth": {"authenticators": ["jwt"], "authorizers": ["recorder"]},
        "jwt": {"jwks_url": jwks_server.url, "issuer": ISSUER, "audience": [AUDIENCE]},
        "units": {"echo": {"command": [sys.executable, "-m", "hsu_echo"], "interfaces": [ECHO]}},
    }
    kernel = await hsu_kernel_factory(raw, plugins=[recorder], names=["hsu_plugin_jwt"])
    # the first fetch runs on a thread
    state = kernel.plugin(STATE)
    assert isinstance(state, KernelKeys)
    assert await asyncio.to_thread(until, lambda: bool(state.current and state.current.reads))

    async def echo(token: str | None) -> str:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        async with grpc.aio.insecure_channel(kernel.address) as ch:
            reply = await echo_pb2_grpc.EchoStub(ch).Echo(
                echo_pb2.EchoRequest(message="hi"), timeout=15, metadata=metadata
            )
        return str(reply.message)

    assert await echo(issuer.token("k1", sub="dave", roles=["read"])) == "hi"
    assert any(i.name == "dave" and i.kind == "jwt" for i in recorder.seen)
    for bad in (issuer.token("k1", exp=int(time.time()) - 3600), None):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(bad)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" not in str(recorder.seen)
