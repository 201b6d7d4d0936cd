"""``mtls``: the caller is the client certificate the TLS handshake verified.

With ``kernel.tls.client_ca`` the kernel's TCP servers require a client
certificate from that CA; grpcio verifies it before any call, and puts what
it proved in the call's auth context. This authenticator turns that into an
:class:`hsu.ports.Identity` of kind ``x509``, named by the certificate's
SPIFFE-style URI SAN (``spiffe://DOMAIN/hsu/UNIT``) or, without one, its
subject's common name. A call without a client certificate (plaintext, a
unix socket, TLS without ``client_ca``) is "not mine". Nothing is read per
call: the handshake did the work, once per connection.

Settings, section ``mtls``::

    mtls:
      trust_domain: example.org     # a SPIFFE ID of another domain is refused
      identity: uri                 # uri: the URI SAN, else the CN (default); cn: the CN

The identity carries no roles of its own: ``rbac`` grants them by identity
name (``grants: [{identity: "spiffe://example.org/hsu/*", roles: [...]}]``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs

import hsu
from hsu.errors import HsuError, Unauthenticated
from hsu.ports import Authenticator, CallInfo, Identity, KernelAPI, Register

NAME = "mtls"


class Naming(enum.StrEnum):
    #: the certificate's URI SAN (one SPIFFE ID, else the only URI), else its CN
    URI = "uri"
    #: the subject's common name, whatever SANs the certificate has
    CN = "cn"


@attrs.frozen
class MtlsSettings:
    """The ``mtls`` section: how a verified client certificate names its holder."""

    #: accept only SPIFFE IDs of this trust domain (``spiffe://DOMAIN/...``);
    #: none: any domain the CA signs
    trust_domain: str | None = None
    #: what names the caller: ``uri`` (default) or ``cn``
    identity: Naming = Naming.URI


class MtlsAuthenticator:
    """Satisfies :class:`hsu.ports.Authenticator` (see the module docstring)."""

    #: it reads no metadata: the kernel caches its answer per connection
    metadata_keys = ()

    def __init__(self, settings: MtlsSettings | None = None):
        self.settings = settings or MtlsSettings()

    def authenticate(self, call: CallInfo) -> Identity | None:
        ctx = call.auth_context
        if not ctx.get("x509_pem_cert") and not ctx.get("x509_common_name"):
            return None  # no client certificate on this connection: not mine
        cn = _text(ctx.get("x509_common_name", ()))
        uris = [_decode(u) for u in ctx.get("peer_uri", ())]
        attributes = {"subject": _text(ctx.get("x509_subject", ()))}
        settings = self.settings
        name = self._uri(settings, uris, attributes) if settings.identity is Naming.URI else None
        name = name or cn
        if not name:
            raise Unauthenticated("mtls: the client certificate names no one (no URI SAN, no CN)")
        if cn:
            attributes["cn"] = cn
        return Identity(name=name, kind="x509", attributes=attributes)

    @staticmethod
    def _uri(settings: MtlsSettings, uris: list[str], attributes: dict[str, str]) -> str | None:
        spiffe = [u for u in uris if u.startswith("spiffe://")]
        if len(spiffe) > 1:
            raise Unauthenticated("mtls: the client certificate holds more than one SPIFFE ID")
        if not spiffe:
            return uris[0] if len(uris) == 1 else None
        uri = urlsplit(spiffe[0])
        domain = settings.trust_domain
        if domain is not None and uri.hostname != domain.lower():
            raise Unauthenticated(
                f"mtls: the client certificate's SPIFFE ID is not of trust domain {domain!r}"
            )
        parts = uri.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "hsu" and parts[1]:
            attributes["unit"] = parts[1]
        return spiffe[0]


def _decode(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _text(values: Any) -> str:
    """The first of an auth context property's values, as text ("" without one)."""
    return next((_decode(v) for v in values), "")


def create(kernel: KernelAPI) -> MtlsAuthenticator:
    """The authenticator factory: this kernel's ``mtls`` settings. Refuses a
    deployment whose servers ask for no client certificate."""
    tls = kernel.settings("kernel").tls
    if tls is None or not tls.client_ca:
        raise HsuError(
            "mtls: kernel.tls.client_ca is not set, so no call carries a verified client"
            " certificate; set kernel.tls (cert, key, client_ca)"
        )
    return MtlsAuthenticator(kernel.settings(NAME))


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(NAME, MtlsSettings)


@hsu.hookimpl
def hsu_register_authenticators(register: Register[Callable[[KernelAPI], Authenticator]]) -> None:
    register(NAME, create)
