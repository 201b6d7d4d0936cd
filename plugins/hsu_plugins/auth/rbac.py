"""``rbac``: roles are sets of method globs; identities hold roles.

A role is a list of ``fnmatch`` globs matched against the full method
without its leading slash: ``hsu.kernel.v1.Kernel/Scale`` on the control
plane, ``hsu.echo.v1.Echo/*`` (interface and method) for routed calls. An
identity holds the roles its authenticator vouches for (a token's
``roles``), on every unit, and those granted to it here, on every unit or
only on the units a grant names. A call is allowed when one of the
identity's roles matches its method (and, for a scoped grant, the call is
about one of the grant's units); else this authorizer abstains, and a call
no authorizer allows is refused, naming a role that would have allowed it.

Shipped roles (a role of the same name in the settings replaces one):

- ``read``: Kernel Status, ListInstances, WatchEvents, ListPlugins; Core
  StreamLogs, Ping, Info
- ``control``: Kernel Scale, Start, Stop, Restart, Reload
- ``register``: Kernel Register, Deregister, ReportLoad (the kernel gives it
  to its instances)
- ``route``: Kernel Resolve, WatchEndpoints (what ``hsu.connect`` asks)
- ``admin``: Core Shutdown

Settings, section ``rbac``::

    rbac:
      roles:
        caller: ["hsu.echo.v1.Echo/*"]
      grants:
        - identity: alice              # an fnmatch glob on the identity's name
          roles: [read, control]
        - identity: "spiffe://example.org/hsu/*"
          roles: [control]
          units: [echo]                # only calls about unit echo
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

import hsu
from hsu.ports import Authorizer, Decision, Identity, KernelAPI, Register

NAME = "rbac"
KERNEL = "hsu.kernel.v1.Kernel/"
CORE = "hsu.core.v1.Core/"

#: the roles rbac ships with
ROLES: Mapping[str, tuple[str, ...]] = {
    "read": (
        *(KERNEL + m for m in ("Status", "ListInstances", "WatchEvents", "ListPlugins")),
        *(CORE + m for m in ("StreamLogs", "Ping", "Info")),
    ),
    "control": tuple(KERNEL + m for m in ("Scale", "Start", "Stop", "Restart", "Reload")),
    "register": tuple(KERNEL + m for m in ("Register", "Deregister", "ReportLoad")),
    "route": tuple(KERNEL + m for m in ("Resolve", "WatchEndpoints")),
    "admin": (CORE + "Shutdown",),
}
#: at most this many decisions remembered
MEMO_SIZE = 8192


@attrs.frozen
class Grant:
    """Roles given to the identities whose names match ``identity``."""

    #: an fnmatch glob on the identity's name
    identity: str = attrs.field(validator=attrs.validators.min_len(1))
    roles: tuple[str, ...] = attrs.field(validator=attrs.validators.min_len(1))
    #: only on these units; empty: on every unit
    units: tuple[str, ...] = ()


@attrs.frozen
class RbacSettings:
    """The ``rbac`` section."""

    #: more roles (a shipped role's name replaces it): role -> method globs
    roles: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    grants: tuple[Grant, ...] = ()


class Rbac:
    """Satisfies :class:`hsu.ports.Authorizer` (see the module docstring)."""

    def __init__(self, settings: RbacSettings):
        roles = {**ROLES, **settings.roles}
        #: role -> one compiled pattern of its globs
        self._roles = {
            name: re.compile("|".join(fnmatch.translate(g) for g in globs) or r"(?!)")
            for name, globs in roles.items()
        }
        self._grants = settings.grants
        self._memo: dict[tuple[Any, ...], Decision] = {}

    @classmethod
    def from_kernel(cls, kernel: KernelAPI) -> Rbac:
        return cls(kernel.settings(NAME))

    def _held(self, identity: Identity) -> list[tuple[str, tuple[str, ...]]]:
        """(role, units) pairs the identity holds; no units: every unit."""
        held: list[tuple[str, tuple[str, ...]]] = [(role, ()) for role in identity.roles]
        for grant in self._grants:
            if fnmatch.fnmatchcase(identity.name, grant.identity):
                held.extend((role, grant.units) for role in grant.roles)
        return held

    def _matches(self, role: str, method: str) -> bool:
        pattern = self._roles.get(role)
        return pattern is not None and pattern.match(method.lstrip("/")) is not None

    def authorize(self, identity: Identity, method: str, unit: str | None) -> Decision:
        key = (identity.name, identity.kind, identity.roles, method, unit)
        known = self._memo.get(key)
        if known is not None:
            return known
        decision = Decision.ABSTAIN
        for role, units in self._held(identity):
            if self._matches(role, method) and (not units or unit in units):
                decision = Decision.ALLOW
                break
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = decision
        return decision

    def missing_role(self, identity: Identity, method: str, unit: str | None) -> str | None:
        """A role that would allow the call (the first, by name)."""
        return next((r for r in sorted(self._roles) if self._matches(r, method)), None)


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(NAME, RbacSettings)


@hsu.hookimpl
def hsu_register_authorizers(register: Register[Callable[[KernelAPI], Authorizer]]) -> None:
    register(NAME, Rbac.from_kernel)
