"""The ``etcd`` section of a deployment."""

from __future__ import annotations

import re
import socket

import attrs

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PREFIX = re.compile(r"(/[A-Za-z0-9_.-]+)+")


def _node(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and not _NODE.fullmatch(value):
        raise ValueError(
            f"node: {value!r} is not a node name (letters, digits, '_', '.', '-'; at most 63)"
        )


def _prefix(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _PREFIX.fullmatch(value):
        raise ValueError(
            f"prefix: {value!r} is not a key prefix like /hsu/v1 (segments of"
            " letters, digits, '_', '.', '-')"
        )


def _endpoints(_: object, attribute: attrs.Attribute[str], value: tuple[str, ...]) -> None:
    from hsu_plugin_etcd.endpoints import target

    target(value, where="")  # the kernel's error names etcd.endpoints


def _patroni(settings: EtcdSettings, attribute: attrs.Attribute[float], value: float) -> None:
    total = settings.loop_wait + 2 * value
    if total > settings.leader_ttl:
        raise ValueError(
            f"loop_wait ({settings.loop_wait:g}) + 2 x retry_timeout ({value:g}) = {total:g} s"
            f" is more than leader_ttl ({settings.leader_ttl}): a leader cut off from etcd could"
            " still run its singleton when its lease expires and another kernel takes over"
            " (Patroni's rule: loop_wait + 2 x retry_timeout <= ttl)"
        )


@attrs.frozen
class EtcdSettings:
    """The ``etcd`` section. Every field has a default."""

    #: the cluster's client endpoints, host:port (several: IP addresses)
    endpoints: tuple[str, ...] = attrs.field(default=("127.0.0.1:2379",), validator=_endpoints)
    #: where hsu's keys live
    prefix: str = attrs.field(default="/hsu/v1", validator=_prefix)
    #: this kernel's name in keys; unique per kernel (default: the host name)
    node: str = attrs.field(default="", validator=_node)
    #: seconds: the kernel's lease; its entries outlive a dead kernel this long
    ttl: int = attrs.field(default=10, validator=attrs.validators.ge(2))
    #: seconds one request to etcd may take
    timeout: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))
    #: leadership (``placement: singleton``), Patroni's three settings:
    #: seconds of the leadership lease ...
    leader_ttl: int = attrs.field(default=10, validator=attrs.validators.ge(2))
    #: ... seconds between two renewals and campaigns ...
    loop_wait: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    #: ... and seconds one renewal (or a singleton's stop) may take
    retry_timeout: float = attrs.field(default=3.0, validator=[attrs.validators.gt(0), _patroni])

    def node_name(self) -> str:
        return self.node or socket.gethostname().split(".")[0]
