"""``jwt``: an hsu authenticator for JWT bearer tokens (``authorization: Bearer <jwt>``).

A token is verified with PyJWT against the keys of a JWKS (a file, or a URL
fetched with ``PyJWKClient``): its signature by the key its header's ``kid``
names, with an algorithm the deployment allows and the key fits; its issuer,
audience and expiry (with ``leeway``); and it must carry ``exp``, ``iss``,
``aud`` and the subject claim. The identity is the subject, with the roles of
``roles_claim`` (a list, or a space separated string such as ``scope``).

A bearer token that is not a JWT (three dot-separated base64url parts whose
header names an algorithm) is "not mine", so a ``token`` authenticator can
stand before or after this one.

Key rotation: a token whose ``kid`` the key set lacks makes the key set be
read again, at most once per ``refetch_cooldown`` seconds whatever callers
send. A file is read again at once (the call then succeeds with the new key);
a URL is fetched on a thread, since an authenticator runs on the kernel's
event loop and must not wait on the network: the call that found the unknown
``kid`` is refused (UNAUTHENTICATED, "retry"), the next one finds the key. A
URL's key set is also fetched every ``refresh_interval`` seconds, so keys an
issuer publishes ahead of using them (as it should) are there first.

Settings, section ``jwt`` (``docs/auth.md``; contrib/hsu-plugin-jwt/README.md)::

    auth:
      authenticators: [jwt]
    jwt:
      jwks_url: https://idp.example.org/.well-known/jwks.json   # or jwks_file: keys.json
      issuer: https://idp.example.org/
      audience: [hsu]
      roles_claim: roles
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from loguru import logger

import hsu
from hsu.config import Seconds
from hsu.errors import Unauthenticated
from hsu.ports import Authenticator, CallInfo, Identity, KernelAPI, Register

if TYPE_CHECKING:
    import jwt

# PyJWT (and cryptography under it, ~11 MiB) is imported where a key set is
# made: a kernel that has this distribution installed but no ``jwt``
# authenticator configured never loads it (docs/benchmarks.md, Footprint)

NAME = "jwt"
#: algorithms never accepted: no signature, or a shared secret where a JWKS
#: publishes public keys (the classic algorithm confusion)
REFUSED_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})


def _algorithms(_: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    refused = sorted(set(value) & REFUSED_ALGORITHMS)
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot verify tokens against a JWKS's public keys")
    if not value:
        raise ValueError("name at least one algorithm")


_positive: Any = attrs.validators.gt(0)


@attrs.frozen
class JwtSettings:
    """The ``jwt`` section. With ``jwt`` in ``auth.authenticators``, one of
    ``jwks_file``/``jwks_url`` and both ``issuer`` and ``audience`` are required."""

    #: a JWKS document on disk (relative to the deployment file)
    jwks_file: str | None = None
    #: a JWKS document over HTTP(S) (no redirects are followed)
    jwks_url: str | None = None
    #: the ``iss`` a token must carry
    issuer: str | None = None
    #: the ``aud`` values accepted: a token must carry one of them
    audience: tuple[str, ...] = ()
    #: signature algorithms accepted (never ``none`` or ``HS*``)
    algorithms: tuple[str, ...] = attrs.field(
        default=("RS256", "ES256", "PS256", "EdDSA"), validator=_algorithms
    )
    #: the claim naming the caller
    subject_claim: str = "sub"
    #: the claim holding the caller's roles: a list or a space separated string;
    #: a dotted path reaches into objects (``realm_access.roles``)
    roles_claim: str = "roles"
    #: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``
    leeway: Seconds = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    #: seconds between fetches of a URL's key set
    refresh_interval: Seconds = attrs.field(default=300.0, validator=_positive)
    #: at least this many seconds between two reads caused by an unknown ``kid``
    refetch_cooldown: Seconds = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    #: seconds a fetch of the URL may take
    timeout: Seconds = attrs.field(default=5.0, validator=_positive)

    def problems(self) -> list[str]:
        """What an enabled ``jwt`` authenticator still needs, one line each."""
        out = []
        if (self.jwks_file is None) == (self.jwks_url is None):
            out.append("jwt: give one of jwks_file or jwks_url (where the signing keys are)")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            out.append(f"jwt.jwks_url: {self.jwks_url!r} is not an http(s) URL")
        if not self.issuer:
            out.append("jwt.issuer: required (the iss a token must carry)")
        if not self.audience:
            out.append("jwt.audience: required (the aud a token must carry)")
        return out


class KeySet:
    """The signing keys of a JWKS, by ``kid``, read again when a token names
    an unknown one (see the module docstring)."""

    def __init__(
        self,
        settings: JwtSettings,
        base_dir: str | Path = ".",
        clock: Callable[[], float] = time.monotonic,
    ):
        import jwt

        self.settings = settings
        self.file = Path(base_dir, settings.jwks_file) if settings.jwks_file else None
        #: fetches a URL's key set (the cooldown and the refresh are this class's)
        self.client = (
            jwt.PyJWKClient(settings.jwks_url, timeout=settings.timeout, cooldown_duration=0)
            if settings.jwks_url
            else None
        )
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        #: how many times the key set was read (tests, logs)
        self.reads = 0
        self._lock = threading.Lock()
        self._last_refetch = -float("inf")
        self._fetching = False

    @property
    def where(self) -> str:
        return str(self.file) if self.file is not None else str(self.settings.jwks_url)

    def load(self) -> None:
        """Read the key set now (blocking: the file, or the URL). Raises
        :class:`hsu.errors.HsuError` in one line when it cannot."""
        import jwt

        try:
            if self.client is not None:
                found = self.client.get_jwk_set(refresh=True)
            else:
                assert self.file is not None
                found = jwt.PyJWKSet.from_json(self.file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise hsu.HsuError(f"jwt: cannot read {self.where}: {exc.strerror or exc}") from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise hsu.HsuError(f"jwt: no usable key set at {self.where}: {exc}") from None
        keys = {k.key_id: k for k in found.keys if k.key_id and k.public_key_use in ("sig", None)}
        with self._lock:
            self.keys = keys
            self.reads += 1

    def load_quietly(self) -> None:
        """:meth:`load`, a failure logged (the keys known so far stay)."""
        try:
            self.load()
        except hsu.HsuError as exc:
            logger.warning("{} (the keys known so far stay in use)", exc)

    def get(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid``; when the set lacks it, read the set again (a file
        now, a URL on a thread) unless that was done less than
        ``refetch_cooldown`` seconds ago."""
        key = self.keys.get(kid)
        if key is not None:
            return key
        with self._lock:
            now = self.clock()
            if self._fetching or now - self._last_refetch < self.settings.refetch_cooldown:
                return None
            self._last_refetch = now
            self._fetching = self.client is not None
        if self.client is None:
            self.load_quietly()  # a local file: cheap, and the call can succeed now
            return self.keys.get(kid)
        threading.Thread(target=self._fetch, name="hsu-jwt-jwks", daemon=True).start()
        return None

    def _fetch(self) -> None:
        try:
            self.load_quietly()
        finally:
            with self._lock:
                self._fetching = False


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _is_jwt(token: str) -> str | None:
    """The ``kid`` of a token shaped like a JWS compact JWT ("" without
    one), or None when it is not one (another kind of bearer token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        return None
    kid = header.get("kid")
    return kid if isinstance(kid, str) else ""


class JwtAuthenticator:
    """Satisfies :class:`hsu.ports.Authenticator` (see the module docstring)."""

    #: the only metadata it reads: the kernel caches its answers per value
    metadata_keys = ("authorization",)

    def __init__(self, settings: JwtSettings, keys: KeySet):
        self.settings = settings
        self.keys = keys

    def authenticate(self, call: CallInfo) -> Identity | None:
        header = call.header("authorization")
        if not isinstance(header, str) or header[:7].lower() != "bearer ":
            return None
        token = header[7:].strip()
        kid = _is_jwt(token)
        if kid is None:
            return None  # a bearer token of another kind
        if not kid:
            raise Unauthenticated("jwt: the token names no signing key (no kid in its header)")
        key = self.keys.get(kid)
        if key is None:
            raise Unauthenticated(
                f"jwt: no signing key {kid!r} in the key set (it is read again at most every"
                f" {self.settings.refetch_cooldown:g} s; retry)"
            )
        return self._verify(token, key)

    def _verify(self, token: str, key: jwt.PyJWK) -> Identity:
        import jwt  # loaded with the key set: a dict lookup here

        s = self.settings
        if key.algorithm_name not in s.algorithms:
            raise Unauthenticated(
                f"jwt: key {key.key_id!r} signs with {key.algorithm_name}, not an allowed algorithm"
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=list(s.audience),
                issuer=s.issuer,
                leeway=s.leeway,
                options={"require": ["exp", "iss", "aud", s.subject_claim]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("jwt: the token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("jwt: the token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("jwt: the token is not from the configured issuer") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"jwt: the token does not verify: {exc}") from None
        subject = _claim(claims, s.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated(f"jwt: the token's {s.subject_claim!r} claim is not a name")
        raw = _claim(claims, s.roles_claim)
        roles: tuple[str, ...] = ()
        if isinstance(raw, str):
            roles = tuple(raw.split())
        elif isinstance(raw, list):
            roles = tuple(r for r in raw if isinstance(r, str))
        attributes = {"iss": str(claims["iss"]), "sub": subject, "exp": str(claims["exp"])}
        return Identity(name=subject, kind="jwt", roles=roles, attributes=attributes)


class KernelKeys:
    """One kernel's key sets, by source, kept across reloads (a reload makes
    a new authenticator; the keys it had stay), and the refresher of the
    one in use."""

    def __init__(self) -> None:
        self.sets: dict[tuple[str | None, str | None, float], KeySet] = {}
        self.current: KeySet | None = None
        self._refresher: asyncio.Task[None] | None = None

    def keys_for(self, settings: JwtSettings, base_dir: str) -> KeySet:
        """The key set of ``settings``'s source, read now if it is new (a
        file: an error fails the start or the reload; a URL: fetched on a
        thread, so that an issuer that is down does not stop the kernel)."""
        source = (settings.jwks_file, settings.jwks_url, settings.timeout)
        keys = self.sets.get(source)
        if keys is None:
            keys = KeySet(settings, base_dir)
            if keys.client is None:
                keys.load()
            else:
                threading.Thread(target=keys.load_quietly, name="hsu-jwt-jwks", daemon=True).start()
            self.sets[source] = keys
        keys.settings = settings
        self.current = keys
        return keys

    @hsu.hookimpl
    def hsu_kernel_started(self) -> None:
        self._refresher = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        while True:
            keys = self.current
            await asyncio.sleep(keys.settings.refresh_interval if keys else 60.0)
            keys = self.current
            if keys is not None and keys.client is not None:
                await asyncio.to_thread(keys.load_quietly)

    @hsu.hookimpl
    async def hsu_kernel_stopping(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None


#: the name of a kernel's :class:`KernelKeys` (``kernel.plugin(STATE)``)
STATE = f"{NAME}.keys"


def create(kernel: KernelAPI) -> JwtAuthenticator:
    """The authenticator factory: this kernel's ``jwt`` settings and keys."""
    settings: JwtSettings = kernel.settings(NAME)
    problems = settings.problems()
    if problems:
        raise hsu.HsuError("; ".join(problems))
    state = kernel.plugin(STATE)
    if not isinstance(state, KernelKeys):  # configured without this module's hook
        state = KernelKeys()
    return JwtAuthenticator(settings, state.keys_for(settings, kernel.deployment.base_dir))


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(NAME, JwtSettings)


@hsu.hookimpl
def hsu_register_authenticators(register: Register[Callable[[KernelAPI], Authenticator]]) -> None:
    register(NAME, create)


@hsu.hookimpl
def hsu_kernel_configure(kernel: KernelAPI) -> None:
    kernel.register_plugin(KernelKeys(), STATE)


__all__ = ["STATE", "JwtAuthenticator", "JwtSettings", "KernelKeys", "KeySet", "create"]
