"""TLS for callers of a kernel: :class:`TLSConfig` and the channels it makes.

A kernel with ``kernel.tls`` serves TLS (mTLS with ``client_ca``) on its data
plane and on a TCP control plane; its unix control socket stays plaintext
(its file mode guards it). A caller names the CA to trust and, for mTLS, its
own certificate and key::

    tls = TLSConfig(ca="ca.pem", cert="me.pem", key="me.key")
    async with hsu.connect("127.0.0.1:7421", tls=tls) as channel: ...

or through the environment, as the ``hsu`` command does: ``HSU_TLS_CA``,
``HSU_TLS_CERT``, ``HSU_TLS_KEY`` (and ``HSU_TLS_SERVER_NAME``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc

from hsu.errors import HsuError

#: environment variables :meth:`TLSConfig.from_env` reads, by field
ENV = {
    "ca": "HSU_TLS_CA",
    "cert": "HSU_TLS_CERT",
    "key": "HSU_TLS_KEY",
    "server_name": "HSU_TLS_SERVER_NAME",
}


@attrs.frozen
class TLSConfig:
    """Where a client finds its TLS material (PEM files, read when a channel
    is made).

    ``ca`` is the CA bundle the server's certificate must chain to (default:
    the system's roots); ``cert`` and ``key``, given together, are the
    client's certificate chain and key for a server that requires one (mTLS);
    ``server_name`` is the name the server's certificate must carry when it
    is not the host in the address.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise HsuError("tls: give a client certificate and its key together (cert and key)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TLSConfig | None:
        """From ``HSU_TLS_CA``, ``HSU_TLS_CERT``, ``HSU_TLS_KEY`` and
        ``HSU_TLS_SERVER_NAME``; None when none of them is set."""
        env = os.environ if env is None else env
        found = {field: env[var] for field, var in ENV.items() if env.get(var)}
        return cls(**found) if found else None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, the files read now."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "ca"),
            private_key=_read(self.key, "key"),
            certificate_chain=_read(self.cert, "cert"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options this configuration adds (the server name)."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise HsuError(f"tls.{what}: cannot read {path}: {exc.strerror or exc}") from None


def uses_tls(address: str, tls: TLSConfig | None) -> bool:
    """Whether a channel to ``address`` speaks TLS: a TLS configuration is
    given and the address is TCP (a kernel's unix socket is plaintext)."""
    return tls is not None and not address.startswith("unix:")


def channel(
    address: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to ``address``: TLS with ``tls`` (see :func:`uses_tls`)."""
    if tls is not None and uses_tls(address, tls):
        return grpc.secure_channel(address, tls.credentials(), [*options, *tls.options()])
    return grpc.insecure_channel(address, options=list(options))


def aio_channel(
    address: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS with ``tls`` (see :func:`uses_tls`)."""
    if tls is not None and uses_tls(address, tls):
        return grpc.aio.secure_channel(address, tls.credentials(), [*options, *tls.options()])
    return grpc.aio.insecure_channel(address, options=list(options))


__all__ = ["ENV", "TLSConfig", "aio_channel", "channel", "uses_tls"]
