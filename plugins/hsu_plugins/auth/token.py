"""``token``: bearer tokens, each naming an identity and its roles.

A caller sends ``authorization: Bearer <token>`` (``hsu.connect(...,
token=...)``, the CLI's ``--token-file``); the token is compared, in constant
time, with every configured one. A call without a bearer token is "not
mine" (the next authenticator is asked); a bearer token that matches none is
refused, unless it has a JWT's shape (three dot-separated parts), which is
left to a JWT authenticator stacked after this one.

Settings, section ``token``::

    token:
      tokens:
        - identity: alice
          token: ${env:ALICE_TOKEN}       # a secret reference, resolved when read
          roles: [read, control]
        - identity: deployer
          file: secrets/deployer.token    # the file's first line; relative to the deployment
          roles: [control]

A token is at least 16 characters. Files are read when the kernel starts and
on each reload. The kernel reuses an authentication for a connection and
token for ``auth.cache_ttl`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

import hsu
from hsu.errors import HsuError, Unauthenticated
from hsu.ports import Authenticator, CallInfo, Identity, KernelAPI, Register

NAME = "token"
#: the metadata a bearer token travels in
HEADER = "authorization"
SCHEME = "bearer "
MIN_LENGTH = 16
#: the largest token file read
MAX_FILE_BYTES = 64 * 1024


def _one_source(inst: TokenEntry, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if (inst.token is None) == (inst.file is None):
        raise ValueError(f"token {inst.identity!r}: give 'token' or 'file' (one of them)")


def _long_enough(inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and len(value) < MIN_LENGTH:
        raise ValueError(f"'{attribute.name}' must be at least {MIN_LENGTH} characters")


@attrs.frozen
class TokenEntry:
    """One accepted token."""

    #: who holds it: the identity's name
    identity: str = attrs.field(validator=attrs.validators.min_len(1))
    #: the token itself (use ``${env:NAME}`` or ``${file:PATH}``)
    token: str | None = attrs.field(default=None, repr=False, validator=_long_enough)
    #: a file holding it (its first line), relative to the deployment file
    file: str | None = attrs.field(default=None, validator=_one_source)
    #: roles its holder has (``rbac``)
    roles: tuple[str, ...] = ()


@attrs.frozen
class TokenSettings:
    """The ``token`` section."""

    tokens: tuple[TokenEntry, ...] = ()


class TokenAuthenticator:
    """Satisfies :class:`hsu.ports.Authenticator` (see the module docstring)."""

    metadata_keys = (HEADER,)

    def __init__(self, entries: list[tuple[bytes, Identity]]):
        self._entries = entries

    @classmethod
    def from_kernel(cls, kernel: KernelAPI) -> TokenAuthenticator:
        """Read the ``token`` section (and its files): HsuError for a file
        that cannot be read or a token that is too short."""
        settings: TokenSettings = kernel.settings(NAME)
        base = Path(kernel.deployment.base_dir)
        entries = []
        for entry in settings.tokens:
            secret = entry.token if entry.token is not None else _read(base, entry)
            identity = Identity(name=entry.identity, kind="token", roles=entry.roles)
            entries.append((secret.encode(), identity))
        return cls(entries)

    def authenticate(self, call: CallInfo) -> Identity | None:
        import hmac  # not at start (docs/benchmarks.md, Footprint)

        value = call.header(HEADER)
        if not isinstance(value, str) or value[: len(SCHEME)].lower() != SCHEME:
            return None
        given = value[len(SCHEME) :].strip().encode()
        found: Identity | None = None
        for secret, identity in self._entries:  # every one: constant time
            if hmac.compare_digest(given, secret) and found is None:
                found = identity
        if found is not None:
            return found
        if given.count(b".") == 2:
            return None  # a JWT's shape: for a JWT authenticator
        raise Unauthenticated("token: the bearer token is not known")


def _read(base: Path, entry: TokenEntry) -> str:
    path = base / str(entry.file)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES)
    except OSError as exc:
        raise HsuError(f"token {entry.identity!r}: cannot read {path}: {exc.strerror}") from None
    lines = raw.decode("utf-8", "replace").splitlines()
    secret = lines[0].strip() if lines else ""
    if len(secret) < MIN_LENGTH:
        raise HsuError(
            f"token {entry.identity!r}: {path} must hold a token of at least {MIN_LENGTH}"
            " characters on its first line"
        )
    return secret


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(NAME, TokenSettings)


@hsu.hookimpl
def hsu_register_authenticators(
    register: Register[Callable[[KernelAPI], Authenticator]],
) -> None:
    register(NAME, TokenAuthenticator.from_kernel)
