"""A client's bearer token for a kernel with auth on (docs/auth.md).

The token travels as gRPC metadata ``authorization: Bearer <token>`` on every
call to the kernel: the Kernel API and the calls through its gateway. It
comes from ``token=``, else a file (``token_file=``, the CLI's
``--token-file``, else ``$HSU_TOKEN_FILE``), whose first line is the token.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from hsu.errors import HsuError

#: the environment variable naming a token file
ENV_TOKEN_FILE = "HSU_TOKEN_FILE"
#: the metadata key a bearer token travels in
HEADER = "authorization"
#: the largest token file read
MAX_BYTES = 64 * 1024

Metadata = tuple[tuple[str, str], ...]


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (its first line); HsuError naming the file if it
    cannot be read or holds none."""
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_BYTES)
    except OSError as exc:
        raise HsuError(f"token file {path}: cannot read it: {exc.strerror}") from None
    lines = raw.decode("utf-8", "replace").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise HsuError(f"token file {path}: holds no token (its first line is empty)")
    return token


def bearer(
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Metadata:
    """The metadata that carries the caller's token: ``token``, else the one
    in ``token_file``, else in ``$HSU_TOKEN_FILE``; empty when there is none."""
    if token is None:
        env = os.environ if env is None else env
        path = token_file if token_file is not None else env.get(ENV_TOKEN_FILE) or None
        if path is None:
            return ()
        token = read_token_file(path)
    if not token or any(c in token for c in "\r\n"):
        raise HsuError("token: empty, or holds a line break")
    return ((HEADER, f"Bearer {token}"),)


class BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the caller's credential to every call of a blocking channel:
    ``grpc.intercept_channel(channel, BearerInterceptor(bearer(...)))``."""

    def __init__(self, metadata: Metadata):
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return _Details(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass
