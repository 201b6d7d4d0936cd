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

Shipped roles (:data:`hsu.roles.ROLES`; a role of the same name in the settings
replaces one):

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
from collections.abc import Callable, Mapping
from typing import Any

import attrs

import hsu
from hsu.ports import Authorizer, Decision, Identity, KernelAPI, Register
from hsu.roles import ROLES, RoleTable

NAME = "rbac"
__all__ = ["ROLES", "Grant", "Rbac", "RbacSettings"]
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
        self._roles = RoleTable(settings.roles)
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

    def authorize(self, identity: Identity, method: str, unit: str | None) -> Decision:
        key = (identity.name, identity.kind, identity.roles, method, unit)
        known = self._memo.get(key)
        if known is not None:
            return known
        decision = Decision.ABSTAIN
        for role, units in self._held(identity):
            if self._roles.allows(role, method) and (not units or unit in units):
                decision = Decision.ALLOW
                break
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = decision
        return decision

    def missing_role(self, identity: Identity, method: str, unit: str | None) -> str | None:
        """A role that would allow the call (the first, by name)."""
        return self._roles.role_for(method)


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(NAME, RbacSettings)


@hsu.hookimpl
def hsu_register_authorizers(register: Register[Callable[[KernelAPI], Authorizer]]) -> None:
    register(NAME, Rbac.from_kernel)
