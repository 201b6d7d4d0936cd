"""``peercred``: on the unix control socket, the caller is its uid.

With auth on and a unix control socket, the kernel reads each connection's
peer credentials as it accepts it (``SO_PEERCRED``: the connecting
process's pid, uid and gid; and its supplementary groups) and hands them to
authenticators as :attr:`hsu.ports.CallInfo.peer_credentials`.

The **authenticator** ``peercred`` turns them into the identity ``uid:N``
(kind ``uid``; attributes ``uid``, ``gid``, ``pid``, ``groups``). A call
without them (TCP: the data plane, a TCP control plane) is "not mine".

The **authorizer** ``peercred`` allows everything to the kernel's own uid
and to root, and to other uids what ``grants`` give them: roles (the
shipped ones, :data:`hsu.roles.ROLES`, and ``roles`` of this section) for a
``uid``, or for a ``gid`` (the caller's group or one of its supplementary
groups), on every unit or only on the ``units`` listed. Anything else it
abstains on (and a call no authorizer allows is refused).

Settings, section ``peercred``::

    peercred:
      socket_mode: "0660"          # a string; default "0600": only this user (and root)
      socket_group: hsu-ops        # with "0660": the socket's group (a name or a gid)
      roles:
        caller: ["hsu.echo.v1.Echo/*"]
      grants:
        - {uid: 1000, roles: [read]}
        - {gid: 2000, roles: [read, control], units: [echo]}

``socket_mode`` widens the control socket's mode (``0660`` for its group,
``0666`` for everyone) when ``peercred`` is among the authenticators: the
file mode no longer decides who gets in, the authorizers do. The socket must
then be in a directory those users can reach (``kernel.control:
unix:PATH``), which the kernel requires to be its user's or root's and not
writable by others.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

import hsu
from hsu.errors import HsuError
from hsu.ports import (
    Authenticator,
    Authorizer,
    CallInfo,
    Decision,
    Identity,
    KernelAPI,
    Register,
)
from hsu.roles import RoleTable

NAME = "peercred"
#: the modes ``socket_mode`` may give the control socket
MODES = {0o600: "only this user", 0o660: "its group too", 0o666: "every user"}


def _mode(value: str) -> int | None:
    """``"0660"`` or ``"0o660"`` as a number (None: not an octal mode)."""
    digits = value[2:] if value[:2].lower() == "0o" else value
    try:
        return int(digits, 8)
    except ValueError:
        return None


def _valid_mode(inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if _mode(value) not in MODES:
        raise ValueError(
            f"'{attribute.name}' must be one of '0600', '0660', '0666' (a string), got {value!r}"
        )


def _group_needs_0660(inst: PeercredSettings, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and _mode(inst.socket_mode) != 0o660:
        raise ValueError(f"'{attribute.name}' is only for socket_mode '0660'")


def _one_of_uid_gid(inst: PeerGrant, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if (inst.uid is None) == (inst.gid is None):
        raise ValueError("a grant names a 'uid' or a 'gid' (one of them)")


@attrs.frozen
class PeerGrant:
    """Roles for the callers of one uid, or of one group."""

    roles: tuple[str, ...] = attrs.field(validator=attrs.validators.min_len(1))
    uid: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )
    #: the caller's group or one of its supplementary groups
    gid: int | None = attrs.field(
        default=None,
        validator=[attrs.validators.optional(attrs.validators.ge(0)), _one_of_uid_gid],
    )
    #: only on these units; empty: on every unit
    units: tuple[str, ...] = ()

    def holds(self, uid: int, gids: set[int]) -> bool:
        return self.uid == uid if self.uid is not None else self.gid in gids


@attrs.frozen
class PeercredSettings:
    """The ``peercred`` section."""

    grants: tuple[PeerGrant, ...] = ()
    #: more roles (a shipped role's name replaces it): role -> method globs
    roles: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: the control socket's mode: "0600" (default), "0660" or "0666"
    socket_mode: str = attrs.field(default="0600", validator=_valid_mode)
    #: with "0660": the socket's group, a name or a number
    socket_group: str | None = attrs.field(default=None, validator=_group_needs_0660)


class PeercredAuthenticator:
    """Satisfies :class:`hsu.ports.Authenticator` (see the module docstring)."""

    #: it reads no metadata: the kernel caches its answer per connection
    metadata_keys = ()

    def __init__(self, socket_mode: int = 0o600, socket_group: int | None = None):
        #: what the kernel gives the control socket (hsu.ports.Authenticator)
        self.socket_mode = socket_mode
        self.socket_group = socket_group

    @classmethod
    def from_kernel(cls, kernel: KernelAPI) -> PeercredAuthenticator:
        """HsuError for a ``socket_group`` that names no group."""
        settings: PeercredSettings = kernel.settings(NAME)
        mode = _mode(settings.socket_mode)
        assert mode is not None  # the settings' validator checked it
        return cls(mode, _gid(settings.socket_group))

    def authenticate(self, call: CallInfo) -> Identity | None:
        creds = call.peer_credentials
        if creds is None:
            return None  # not on the unix control socket: not mine
        return Identity(
            name=f"uid:{creds.uid}",
            kind="uid",
            attributes={
                "uid": str(creds.uid),
                "gid": str(creds.gid),
                "pid": str(creds.pid),
                "groups": ",".join(map(str, creds.groups)),
            },
        )


class PeercredAuthorizer:
    """Satisfies :class:`hsu.ports.Authorizer` (see the module docstring)."""

    def __init__(self, settings: PeercredSettings | None = None, owner: int | None = None):
        settings = settings or PeercredSettings()
        self._table = RoleTable(settings.roles)
        self._grants = settings.grants
        #: everything is allowed to these uids: the kernel's own, and root
        self.owners = frozenset({0, os.geteuid() if owner is None else owner})
        for i, grant in enumerate(self._grants):
            unknown = [r for r in grant.roles if r not in self._table]
            if unknown:
                raise HsuError(
                    f"peercred.grants[{i}]: unknown role {unknown[0]!r} (known:"
                    f" {', '.join(self._table.names)})"
                )

    @classmethod
    def from_kernel(cls, kernel: KernelAPI) -> PeercredAuthorizer:
        return cls(kernel.settings(NAME))

    def authorize(self, identity: Identity, method: str, unit: str | None) -> Decision:
        uid = _uid(identity)
        if uid is None:
            return Decision.ABSTAIN  # not a peercred identity
        if uid in self.owners:
            return Decision.ALLOW
        gids = _gids(identity)
        for grant in self._grants:
            if not grant.holds(uid, gids) or (grant.units and unit not in grant.units):
                continue
            if any(self._table.allows(role, method) for role in grant.roles):
                return Decision.ALLOW
        return Decision.ABSTAIN

    def missing_role(self, identity: Identity, method: str, unit: str | None) -> str | None:
        """A role that would allow the call (the first, by name)."""
        return self._table.role_for(method) if _uid(identity) is not None else None


def _uid(identity: Identity) -> int | None:
    """The uid of an identity of kind ``uid`` (None for any other)."""
    if identity.kind != "uid":
        return None
    raw = identity.attributes.get("uid", "")
    if not raw.isdigit() or identity.name != f"uid:{raw}":
        return None
    return int(raw)


def _gids(identity: Identity) -> set[int]:
    attrs_ = identity.attributes
    found = {int(g) for g in attrs_.get("groups", "").split(",") if g.isdigit()}
    gid = attrs_.get("gid", "")
    if gid.isdigit():
        found.add(int(gid))
    return found


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise HsuError(f"peercred.socket_group: no group named {group!r}") from None


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(NAME, PeercredSettings)


@hsu.hookimpl
def hsu_register_authenticators(
    register: Register[Callable[[KernelAPI], Authenticator]],
) -> None:
    register(NAME, PeercredAuthenticator.from_kernel)


@hsu.hookimpl
def hsu_register_authorizers(register: Register[Callable[[KernelAPI], Authorizer]]) -> None:
    register(NAME, PeercredAuthorizer.from_kernel)
