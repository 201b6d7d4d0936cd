"""Every error hsu raises on purpose derives from :class:`HsuError`.

The CLI prints an ``HsuError`` as one clear message and exits non-zero; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class HsuError(Exception):
    """Base of hsu's deliberate errors: the message says what and where."""


class PluginError(HsuError):
    """A plugin could not be loaded, registered or validated."""


class UnknownPlugin(PluginError):
    """A plugin name that is neither an entry point nor an importable module;
    ``name`` is the name, ``suggestion`` the closest known one ("" if none)."""

    def __init__(self, message: str, name: str, suggestion: str = ""):
        super().__init__(message)
        self.name = name
        self.suggestion = suggestion


class PluginLoadError(PluginError):
    """A plugin the user asked for failed to import or register.

    The original exception is chained as ``__cause__``.
    """

    def __init__(self, name: str, dist: str | None, version: str | None, exc: BaseException):
        self.name = name
        self.dist = dist
        self.version = version
        where = f" from {dist} {version}" if dist else ""
        super().__init__(f"Error importing plugin {name!r}{where}: {type(exc).__name__}: {exc}")


class ConflictError(PluginError):
    """Two plugins registered a capability under the same name."""


class InvalidTransition(HsuError):
    """A state machine was asked for a move its table does not allow."""


class ConfigError(HsuError):
    """The deployment is not valid. ``problems`` lists every one found."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid deployment {source}" if source else "invalid deployment"
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{head}: {len(problems)} problem(s)\n{lines}")


class LaunchError(HsuError):
    """An instance could not be started (missing executable, bad cwd, ...)."""


class NoSuchUnit(HsuError):
    """A unit or interface was asked for that the deployment does not have."""


class InvalidValue(HsuError):
    """A value from outside (an RPC's field, an address) is malformed or out of
    bounds (:mod:`hsu.validate`); the message names the field."""


class NotAllowed(HsuError):
    """The caller did not prove it may do this: a missing or wrong credential,
    or something only the kernel's own instances may do."""


class OverLimit(HsuError):
    """A cap or a rate limit refused the request; it may succeed later."""


class Unauthenticated(HsuError):
    """A call carries no credential any authenticator accepts, or a bad one
    (gRPC ``UNAUTHENTICATED``). An authenticator raises it for a credential
    of its kind that is not good; the message never holds the secret."""


class PermissionDenied(HsuError):
    """The caller is known but may not make this call (gRPC
    ``PERMISSION_DENIED``); the message names the method and a missing role."""


class QueueFull(HsuError):
    """A unit's instances are all at ``routing.max_inflight`` and its queue is
    full (RESOURCE_EXHAUSTED)."""


class QueueTimeout(HsuError):
    """A call waited in its unit's queue until its deadline; it was never
    sent (DEADLINE_EXCEEDED)."""


class LeaseEnded(HsuError):
    """A lease is over (expired, released, or its instance died)."""


class StorageError(HsuError):
    """A storage (:class:`hsu.ports.Storage`) could not do what was asked: a
    full disk, a corrupt file, a refused write; the message names the store
    (its file or address) and nothing was written."""


class StorageUnavailable(StorageError):
    """The storage's server cannot be reached (gRPC ``UNAVAILABLE``); the
    message names its address. Nothing asked for in the failed call happened,
    unless the error says it may have."""


class CacheError(HsuError):
    """A cache (:class:`hsu.ports.Cache`) could not do what was asked (its
    server cannot be reached, it refused the value); the message names it. A
    layered cache skips the layer; no routed call fails because of it."""
