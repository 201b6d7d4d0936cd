"""TLS on the kernel's servers (``kernel.tls``), with certificates rotated on disk.

grpcio asks a *fetcher* for the certificate configuration at every new
connection's handshake (``grpc.dynamic_ssl_server_credentials``). The fetcher
here looks at the files' ``stat`` (three ``stat`` calls a handshake) and reads
them again only when one changed: a certificate replaced on disk is served to
the next connection, without a restart, and connections already open keep
theirs. A pair that does not load (a key that does not match its
certificate, a file written halfway) is not taken: the kernel goes on
serving the last good one and logs the problem once per change.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import grpc
from loguru import logger

from hsu._kernel.config.model import TLSSettings
from hsu.errors import HsuError

#: what identifies a file's content without reading it
Signature = tuple[tuple[int, int, int, int], ...]


class ServerTLS:
    """The server credentials of one listening port, watching the files."""

    def __init__(self, settings: TLSSettings, base_dir: str | Path = "."):
        base = Path(base_dir)
        self.cert = base / settings.cert
        self.key = base / settings.key
        self.client_ca = base / settings.client_ca if settings.client_ca else None
        self.mutual = settings.mutual
        self._lock = threading.Lock()
        self._seen: Signature = ()
        self._initial = self._load(strict=True)
        #: how many times a changed set of files was taken (tests, logs)
        self.reloads = 0

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert, self.key, self.client_ca) if p is not None]

    def _signature(self) -> Signature:
        out = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                out.append((0, 0, 0, 0))
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def _load(self, *, strict: bool) -> Any:
        """Read the files into a grpc certificate configuration.

        ``strict``: at start, a problem is an error (one line naming the
        file); later it is logged and None returned (the last one stays).
        """
        self._seen = self._signature()
        try:
            cert, key = _read(self.cert, "cert"), _read(self.key, "key")
            ca = _read(self.client_ca, "client_ca") if self.client_ca else None
            _check_pair(self.cert, self.key, self.client_ca)
        except HsuError as exc:
            if strict:
                raise
            logger.warning("kernel.tls: keeping the certificate served so far: {}", exc)
            return None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> Any:
        """grpcio's fetcher: a new configuration when the files changed, else None."""
        try:
            with self._lock:
                if self._signature() == self._seen:
                    return None
                config = self._load(strict=False)
                if config is not None:
                    self.reloads += 1
                    logger.info("kernel.tls: serving the certificate in {} (changed)", self.cert)
                return config
        except Exception as exc:  # a fetcher that raises fails the handshake
            logger.opt(exception=exc).error("kernel.tls: reading the certificate failed")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``: this watcher's files, required
        client certificates when ``client_ca`` is set."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HsuError(f"kernel.tls.{what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise HsuError(f"kernel.tls.{what}: {path} holds no PEM block")
    return data


def _check_pair(cert: Path, key: Path, client_ca: Path | None) -> None:
    """The key matches the certificate and the CA bundle parses (stdlib ssl),
    so that grpcio is never handed a pair that fails every handshake."""
    import ssl  # here: a kernel without kernel.tls does not pay for it at start

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise HsuError(
            f"kernel.tls: {cert} and {key} do not load as a certificate and its key: {exc}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise HsuError(f"kernel.tls.client_ca: {client_ca}: not a CA bundle: {exc}") from None


__all__ = ["ServerTLS"]
