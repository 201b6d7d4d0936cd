"""Roles: named sets of the methods they allow, for authorizer plugins.

A role is a list of ``fnmatch`` globs matched against the full method
without its leading slash: ``hsu.kernel.v1.Kernel/Scale`` on the control
plane, ``hsu.echo.v1.Echo/*`` (interface and method) for a routed call.
:data:`ROLES` are the roles hsu ships (the ``rbac`` and ``peercred``
authorizers use them, docs/auth.md); :class:`RoleTable` matches methods
against them and against a deployment's own.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

__all__ = ["CACHE", "CORE", "KERNEL", "ROLES", "STORAGE", "RoleTable"]

#: the Kernel API's methods start with this (without the leading slash)
KERNEL = "hsu.kernel.v1.Kernel/"
#: the kernel's (and every HSU's) Core
CORE = "hsu.core.v1.Core/"
#: the Storage service's methods' prefix
STORAGE = "hsu.storage.v1.Storage/"
#: the Cache service's methods' prefix
CACHE = "hsu.cache.v1.Cache/"

#: the shipped roles: name -> method globs
ROLES: Mapping[str, tuple[str, ...]] = {
    "read": (
        *(KERNEL + m for m in ("Status", "ListInstances", "WatchEvents", "ListPlugins")),
        *(CORE + m for m in ("StreamLogs", "Ping", "Info", "Metrics")),
    ),
    "control": tuple(KERNEL + m for m in ("Scale", "Start", "Stop", "Restart", "Reload")),
    "register": tuple(KERNEL + m for m in ("Register", "Deregister", "ReportLoad", "PublishEvent")),
    "route": tuple(
        KERNEL + m for m in ("Resolve", "WatchEndpoints", "Slots", "Lease", "Renew", "Release")
    ),
    "admin": (CORE + "Shutdown",),
    # a namespace's keys (docs/storage.md); an HSU needs none for its own
    "storage": (STORAGE + "*",),
    # a namespace's cached values (docs/cache.md); an HSU needs none for its own
    "cache": (CACHE + "*",),
}


class RoleTable:
    """The shipped roles plus ``extra`` ones (a shipped role's name in
    ``extra`` replaces it), each compiled once into one pattern."""

    def __init__(self, extra: Mapping[str, Iterable[str]] | None = None):
        roles = {**ROLES, **(extra or {})}
        self._patterns = {
            name: re.compile("|".join(fnmatch.translate(g) for g in globs) or r"(?!)")
            for name, globs in roles.items()
        }

    def __contains__(self, role: object) -> bool:
        return role in self._patterns

    @property
    def names(self) -> tuple[str, ...]:
        """Every role's name, sorted."""
        return tuple(sorted(self._patterns))

    def allows(self, role: str, method: str) -> bool:
        """Whether ``role`` (an unknown one allows nothing) matches ``method``
        (the full method, with or without its leading slash)."""
        pattern = self._patterns.get(role)
        return pattern is not None and pattern.match(method.lstrip("/")) is not None

    def role_for(self, method: str) -> str | None:
        """A role that allows ``method`` (the first by name), or None."""
        return next((r for r in self.names if self.allows(r, method)), None)
