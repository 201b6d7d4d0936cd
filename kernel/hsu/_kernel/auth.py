"""Auth on the kernel's servers: who is calling, and may they (docs/auth.md).

When the deployment names authenticators (``auth.authenticators``), both of
the kernel's gRPC servers get an :class:`AuthInterceptor`. Every call but a
health check is authenticated: the kernel's own ``instance`` authenticator
first (an HSU's ``hsu-instance-token``), then the deployment's, in order;
the first :class:`~hsu.ports.Identity` wins. Then every authorizer in
``auth.authorizers`` is asked about (identity, method, unit): a ``DENY``
wins, and no ``ALLOW`` refuses the call. The unit is read from the request
(a Kernel API call's ``unit``, ``instance_id`` or ``interface``) or, for a
routed call on the data plane, is the unit serving the interface.

An authentication is reused for ``auth.cache_ttl`` seconds for the same
connection (peer and transport credentials) and the same credential
metadata, so a token is not checked again on every call. A plugin that fails
(raises anything but :class:`~hsu.errors.Unauthenticated`) refuses the call
(fail closed) and is logged once per cause.
"""

from __future__ import annotations

import collections
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import grpc
from loguru import logger

from hsu import identity as forwarded
from hsu.errors import HsuError, Unauthenticated
from hsu.identity import TOKEN_METADATA
from hsu.ports import (
    Authenticator,
    Authorizer,
    AuthSettings,
    CallInfo,
    Decision,
    Identity,
    PeerCredentials,
)

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

#: the settings section
SECTION = "auth"
#: never authenticated: load balancers and orchestrators probe health
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: need an identity, but no role: the service schema only
IDENTIFIED_PREFIXES = ("/grpc.reflection.",)
#: what the kernel itself allows an instance identity (the handshake; the
#: servicer then checks the token belongs to the instance the call names)
INSTANCE_METHODS = frozenset(
    f"/hsu.kernel.v1.Kernel/{m}" for m in ("Register", "Deregister", "ReportLoad", "PublishEvent")
)
#: what an instance identity may call whatever the authorizers say: the
#: storage and cache servicers keep it to its unit's namespace
#: (hsu._kernel.storage_service, hsu._kernel.cache_service)
INSTANCE_PREFIXES = ("/hsu.storage.v1.Storage/", "/hsu.cache.v1.Cache/")
#: roles the kernel's ``instance`` authenticator vouches for
INSTANCE_ROLES = ("register", "route")
#: at most this many cached authentications
CACHE_SIZE = 4096
#: at most this many causes remembered as logged
LOGGED_SIZE = 1024

#: the identity of the call being served (set around each handler)
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("hsu_caller", default=None)


class InstanceAuthenticator:
    """The kernel's own: an HSU's ``hsu-instance-token`` is the secret of a
    live instance (or an unmanaged unit's ``token``)."""

    metadata_keys = (TOKEN_METADATA,)

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def authenticate(self, call: CallInfo) -> Identity | None:
        import hmac  # not at start (docs/benchmarks.md, Footprint)

        sent = call.header(TOKEN_METADATA)
        if sent is None:
            return None
        if not isinstance(sent, str) or not sent:
            raise Unauthenticated(f"{TOKEN_METADATA}: not a token")
        given = sent.encode()
        found: Identity | None = None
        # every secret is compared (constant time), so the time taken does not
        # tell how far a guess got
        for inst in self.kernel.instances.values():
            if inst.token and hmac.compare_digest(given, inst.token.encode()):
                found = Identity(
                    f"instance:{inst.instance_id}",
                    "instance",
                    INSTANCE_ROLES,
                    {"unit": inst.unit, "instance_id": inst.instance_id},
                )
        for name, spec in self.kernel.deployment.units.items():
            if spec.token and hmac.compare_digest(given, spec.token.encode()) and found is None:
                found = Identity(f"unit:{name}", "instance", INSTANCE_ROLES, {"unit": name})
        if found is None:
            raise Unauthenticated(f"{TOKEN_METADATA}: no live instance has this token")
        return found


@attrs.frozen
class Chain:
    """The authenticators and authorizers of one deployment, by name, in order."""

    settings: AuthSettings
    authenticators: tuple[tuple[str, Authenticator], ...]
    authorizers: tuple[tuple[str, Authorizer], ...]
    #: the metadata keys the authenticators read (None: any, so all of it)
    keys: frozenset[str] | None


def build(kernel: Any, settings: AuthSettings) -> Chain:
    """Call the factories the deployment names; raises :class:`HsuError` (one
    line) for an unknown name or a factory that fails."""
    plugins = kernel.plugins

    def make(kind: str, name: str) -> Any:
        factory = plugins.get(kind, name)
        try:
            return factory(kernel)
        except HsuError as exc:
            raise HsuError(f"auth: {kind} {name!r}: {exc}") from None

    authenticators = tuple((n, make("authenticator", n)) for n in settings.authenticators)
    authorizers = tuple((n, make("authorizer", n)) for n in settings.authorizers)
    keys: frozenset[str] | None = frozenset({TOKEN_METADATA})
    for _, authn in authenticators:
        declared = getattr(authn, "metadata_keys", None)
        keys = None if declared is None or keys is None else keys | frozenset(declared)
    return Chain(settings, authenticators, authorizers, keys)


class _SettingsView:
    """The kernel as factories see it during a reload's validation: the new
    settings, everything else the running kernel's."""

    def __init__(self, kernel: Kernel, settings: Mapping[str, Any]):
        self._kernel = kernel
        self._settings = settings

    def settings(self, section: str) -> Any:
        if section in self._settings:
            return self._settings[section]
        return self._kernel.settings(section)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)


def reload_problems(kernel: Kernel, settings: Mapping[str, Any], source: str | None) -> list[str]:
    """What keeps a reload's ``auth`` from applying: turning auth on or off
    (the servers are built with or without it), or a factory that fails."""
    new: AuthSettings | None = settings.get(SECTION)
    old = _settings(kernel)
    if new is None or old is None:
        return []
    where = f"{source}: " if source else ""
    if new.enabled != old.enabled:
        return [
            f"{where}auth.authenticators: turning auth {'on' if new.enabled else 'off'}"
            " applies when the kernel starts: restart it"
        ]
    if not new.enabled:
        return []
    try:
        build(_SettingsView(kernel, settings), new)
    except HsuError as exc:
        return [f"{where}{exc}"]
    return []


def _settings(kernel: Kernel) -> AuthSettings | None:
    try:
        found: AuthSettings = kernel.settings(SECTION)
    except HsuError:
        return None
    return found


def enabled(kernel: Kernel) -> bool:
    """Whether the deployment turns auth on (some authenticator is named)."""
    settings = _settings(kernel)
    return settings is not None and settings.enabled


class _Once:
    """Log each cause once (bounded), not once per call."""

    def __init__(self) -> None:
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __call__(self, cause: str, message: str, *args: Any) -> None:
        if cause in self._seen:
            return
        self._seen[cause] = None
        if len(self._seen) > LOGGED_SIZE:
            self._seen.popitem(last=False)
        logger.opt(depth=1).error(message, *args)


class Refused(Exception):
    """A call the gate refuses: its gRPC status and one-line message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class AuthGate:
    """Authenticates and authorizes calls for one kernel (both planes)."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.instance = InstanceAuthenticator(kernel)
        #: (peer, transport, credential digest) -> (identity, expires at)
        self._cache: collections.OrderedDict[tuple[str, bytes, bytes], tuple[Identity, float]]
        self._cache = collections.OrderedDict()
        #: signed hsu-identity values: (id(identity), instance) -> (identity, value, until)
        self._signed: dict[tuple[int, str], tuple[Identity, str, float]] = {}
        #: (id(identity), method, unit) -> (identity, chain, None or (code, message))
        self._decisions: collections.OrderedDict[tuple[int, str, str | None], Any]
        self._decisions = collections.OrderedDict()
        self.log_once = _Once()
        #: the peer credentials of the control socket's connections, by gRPC
        #: peer (filled by hsu._kernel.peercred when the kernel reads them)
        self.peers: Mapping[str, PeerCredentials] = {}
        self._seen: object = None
        self._chain = self._current()

    def socket_access(self) -> tuple[int, int | None]:
        """The unix control socket's mode and group: 0600 and None, unless an
        authenticator that tells its callers apart widens them
        (``socket_mode``, ``socket_group``; the first that says)."""
        for _, authn in self._chain.authenticators:
            mode = getattr(authn, "socket_mode", None)
            if isinstance(mode, int) and mode != 0o600:
                group = getattr(authn, "socket_group", None)
                return mode, group if isinstance(group, int) else None
        return 0o600, None

    # -- the chain in force ---------------------------------------------------

    def _current(self) -> Chain:
        """The chain for the settings in force; rebuilt after a reload (which
        checked it builds: ``reload_problems``). A rebuild that fails anyway
        keeps the old chain and says so."""
        seen = self.kernel.settings(SECTION)
        if seen is self._seen:
            return self._chain
        settings: AuthSettings = seen
        try:
            chain = build(self.kernel, settings)
        except HsuError as exc:
            if self._seen is None:
                raise
            self.log_once(f"build:{exc}", "auth: {}; keeping the previous auth settings", exc)
            self._seen = seen
            return self._chain
        self._seen = seen
        self._chain = chain
        self._cache.clear()
        return chain

    # -- authentication ---------------------------------------------------------

    def authenticate(self, context: Any, method: str, plane: str) -> Identity:
        """The caller's identity, or :class:`Refused`."""
        peer = context.peer()
        return self.authenticate_call(
            method,
            tuple(context.invocation_metadata() or ()),
            peer,
            plane,
            _transport(context),
            self.peers.get(peer) if plane == "control" else None,
        )

    def authenticate_call(
        self,
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
        peer: str,
        plane: str,
        transport: Mapping[str, tuple[bytes, ...]],
        creds: PeerCredentials | None = None,
    ) -> Identity:
        """The identity of a call described by its parts, or :class:`Refused`."""
        chain = self._current()
        call = CallInfo(method, metadata, peer, plane, transport, creds)
        try:
            ident = self.instance.authenticate(call)
        except Unauthenticated as exc:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {exc}") from None
        if ident is not None:
            return ident
        key = (peer, _digest_transport(transport), _digest(metadata, chain.keys))
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        for name, authn in chain.authenticators:
            try:
                ident = authn.authenticate(call)
            except Unauthenticated as exc:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {name}: {exc}") from None
            except Exception as exc:
                self.log_once(
                    f"authn:{name}:{type(exc).__name__}:{exc}",
                    "auth: authenticator {!r} failed ({}: {}); calls it is asked about are refused",
                    name,
                    type(exc).__name__,
                    exc,
                )
                raise Refused(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{method}: authenticator {name!r} failed; the call is refused (see the"
                    " kernel's log)",
                ) from None
            if ident is not None:
                if chain.settings.cache_ttl > 0:
                    self._cache[key] = (ident, now + chain.settings.cache_ttl)
                    if len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
                return ident
        names = ", ".join(["instance", *(n for n, _ in chain.authenticators)])
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{method}: no credentials that an authenticator accepts ({names})",
        )

    # -- authorization -----------------------------------------------------------

    def authorize(self, identity: Identity, method: str, unit: str | None) -> None:
        """Return if ``identity`` may call ``method`` about ``unit``, else :class:`Refused`.

        A decision is reused while the identity (the object the authentication
        cache hands out) and the chain (the settings in force) are the same:
        a gateway's calls of one connection pay one dictionary lookup."""
        if identity.kind == "instance" and (
            method in INSTANCE_METHODS or method.startswith(INSTANCE_PREFIXES)
        ):
            return
        if method.startswith(IDENTIFIED_PREFIXES):
            return
        chain = self._chain
        key = (id(identity), method, unit)
        hit = self._decisions.get(key)
        if hit is not None and hit[0] is identity and hit[1] is chain:
            if hit[2] is None:
                return
            raise Refused(*hit[2])
        try:
            self._decide(chain, identity, method, unit)
        except Refused as refused:
            self._remember(key, (identity, chain, (refused.code, refused.message)))
            raise
        self._remember(key, (identity, chain, None))

    def _remember(self, key: tuple[int, str, str | None], decision: Any) -> None:
        self._decisions[key] = decision
        if len(self._decisions) > CACHE_SIZE:
            self._decisions.popitem(last=False)

    def _decide(self, chain: Chain, identity: Identity, method: str, unit: str | None) -> None:
        allowed = False
        denied_by = ""
        for name, authz in chain.authorizers:
            try:
                decision = authz.authorize(identity, method, unit)
            except Exception as exc:
                self.log_once(
                    f"authz:{name}:{type(exc).__name__}:{exc}",
                    "auth: authorizer {!r} failed ({}: {}); calls it is asked about are refused",
                    name,
                    type(exc).__name__,
                    exc,
                )
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method}: authorizer {name!r} failed; the call is refused (see the"
                    " kernel's log)",
                ) from None
            if decision is Decision.DENY:
                denied_by = name
                break
            if decision is Decision.ALLOW:
                allowed = True
        if allowed and not denied_by:
            return
        about = f" on unit {unit!r}" if unit else ""
        if denied_by:
            why = f"{about}: denied by {denied_by}"
        else:
            role = self._missing_role(chain, identity, method, unit)
            why = (
                f": it needs role {role!r}{about}" if role else f"{about}: no authorizer allows it"
            )
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED, f"{method}: {identity.name} may not call it{why}"
        )

    @staticmethod
    def _missing_role(
        chain: Chain, identity: Identity, method: str, unit: str | None
    ) -> str | None:
        for _, authz in chain.authorizers:
            ask = getattr(authz, "missing_role", None)
            if ask is None:
                continue
            try:
                role: str | None = ask(identity, method, unit)
            except Exception:
                continue
            if role:
                return role
        return None

    # -- the unit a call is about ---------------------------------------------------

    def unit_of_request(self, request: Any) -> str | None:
        """A Kernel API or Core request's unit: its ``unit``, its instance's,
        or the one unit serving its ``interface``."""
        unit = getattr(request, "unit", "")
        if isinstance(unit, str) and unit:
            return unit
        namespace = getattr(request, "namespace", "")
        if isinstance(namespace, str) and namespace:
            if type(request).DESCRIPTOR.full_name.startswith("hsu.cache."):
                from hsu._kernel import cache_service

                return cache_service.namespace_unit(self.kernel, namespace)
            from hsu._kernel.storage_service import namespace_unit

            return namespace_unit(self.kernel, namespace)
        instance_id = getattr(request, "instance_id", "")
        if isinstance(instance_id, str) and instance_id:
            inst = self.kernel.instances.get(instance_id)
            return inst.unit if inst is not None else None
        interface = getattr(request, "interface", "")
        if isinstance(interface, str) and interface:
            return self.unit_of_interface(interface)
        return None

    def unit_of_interface(self, interface: str) -> str | None:
        """The unit serving ``interface``; None when none does or several do
        (a grant scoped to one unit then does not apply)."""
        units = self.kernel.units_serving(interface)
        return units[0] if len(units) == 1 else None

    # -- the identity forwarded to an HSU ------------------------------------------

    def sign_for(self, identity: Identity, instance_id: str) -> str | None:
        """``identity`` as the ``hsu-identity`` value for ``instance_id``, signed
        with its secret (None when it has none); reused for a minute."""
        now = time.monotonic()
        key = (id(identity), instance_id)
        hit = self._signed.get(key)
        if hit is not None and hit[0] is identity and hit[2] > now:
            return hit[1]
        inst = self.kernel.instances.get(instance_id)
        if inst is None:
            return None
        secret = inst.token
        if not secret:
            spec = self.kernel.deployment.units.get(inst.unit)
            secret = getattr(spec, "token", None) or ""
        if not secret:
            return None
        value = forwarded.sign(identity, secret, instance_id)
        if len(self._signed) > CACHE_SIZE:
            self._signed.clear()
        self._signed[key] = (identity, value, now + 60.0)
        return value


def _transport(context: Any) -> Mapping[str, tuple[bytes, ...]]:
    try:
        found = context.auth_context() or {}
    except Exception:
        return {}
    return {k: tuple(v) for k, v in found.items()}


def _digest_transport(transport: Mapping[str, tuple[bytes, ...]]) -> bytes:
    import hashlib  # not at start (docs/benchmarks.md, Footprint)

    if not transport:
        return b""
    h = hashlib.sha256()
    for k in sorted(transport):
        h.update(k.encode())
        for v in transport[k]:
            h.update(b"\0" + v)
        h.update(b"\1")
    return h.digest()


def _digest(metadata: tuple[tuple[str, Any], ...], keys: frozenset[str] | None) -> bytes:
    """A digest of the credential metadata (every key when ``keys`` is None)."""
    import hashlib  # not at start (docs/benchmarks.md, Footprint)

    h = hashlib.sha256()
    for k, v in metadata:
        if keys is not None and k not in keys:
            continue
        h.update(k.encode())
        h.update(b"\0")
        h.update(v if isinstance(v, bytes) else v.encode())
        h.update(b"\1")
    return h.digest()


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler of one server (``plane``) in the gate's checks."""

    def __init__(self, gate: AuthGate, plane: str):
        self.gate = gate
        self.plane = plane
        #: method -> (the handler, its wrapped handler): the servicers and the
        #: gateway hand out the same handler for a method, so it is wrapped once
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < CACHE_SIZE:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        gate, plane = self.gate, self.plane
        data_unit: Callable[[], str | None] | None = None
        if plane == "data":
            interface = method[1:].partition("/")[0]

            def data_unit() -> str | None:
                return gate.unit_of_interface(interface)

        async def admit(context: Any, request: Any) -> Identity:
            try:
                ident = gate.authenticate(context, method, plane)
                if data_unit is not None:
                    unit = data_unit()
                elif request is not None:
                    unit = gate.unit_of_request(request)
                else:
                    unit = None
                gate.authorize(ident, method, unit)
            except Refused as refused:
                await context.abort(refused.code, refused.message)
                raise AssertionError("unreachable") from None
            return ident

        if not handler.request_streaming and not handler.response_streaming:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                token = CALLER.set(await admit(context, request))
                try:
                    return await _result(inner(request, context))
                finally:
                    CALLER.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if not handler.request_streaming:
            inner = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                CALLER.set(await admit(context, request))
                async for reply in _replies(inner(request, context)):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if not handler.response_streaming:
            inner = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                token = CALLER.set(await admit(context, None))
                try:
                    return await _result(inner(requests, context))
                finally:
                    CALLER.reset(token)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        inner = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            CALLER.set(await admit(context, None))
            async for reply in _replies(inner(requests, context)):
                yield reply

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )


async def _result(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _replies(result: Any) -> AsyncIterator[Any]:
    """A streaming behavior's replies: an async iterator, or a coroutine that
    writes them itself (``context.write``)."""
    if hasattr(result, "__aiter__"):
        async for reply in result:
            yield reply
    elif inspect.isawaitable(result):
        await result
    else:
        for reply in result or ():
            yield reply


def gate_for(kernel: Kernel) -> AuthGate | None:
    """The kernel's gate when the deployment turns auth on (else None); raises
    :class:`HsuError` when a plugin serves the data plane in the kernel's place
    without saying it enforces auth (``DataPlane(enforces_auth=True)``), or
    the chain does not build."""
    if not enabled(kernel):
        return None
    if kernel.bind_address != kernel.requested_address and not kernel.moved_plane_enforces_auth:
        raise HsuError(
            f"auth: a plugin serves the data plane at {kernel.requested_address} (the nginx"
            " gateway?) and does not enforce auth; use the python gateway with auth"
        )
    return AuthGate(kernel)
