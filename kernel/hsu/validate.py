"""Checks for values that come from outside: RPC fields, addresses, names.

Every check returns the value it accepted, or raises
:class:`hsu.errors.InvalidValue` with one line that names the field and shows
the value (with ``repr``, cut short): a message never carries a newline, a
control character or megabytes of someone else's text into a log. The kernel
checks every field of ``Kernel.Register`` with these; a plugin that writes a
value into something a program parses (the nginx gateway's config, say) should
check it again here, where it enters.

What is accepted:

``address``
    ``host:port`` (an IP literal, ``[v6]`` in brackets, or a host name of
    letters, digits, ``-`` and ``.``; port 1-65535) or ``unix:/absolute/path``
    (letters, digits and ``._/+@=,~-``, no ``..``, at most 107 bytes). Never
    whitespace, control characters or any of ``{};"'\\$#``; at most
    :data:`MAX_ADDRESS` characters. Refused outright: the unspecified address
    (``0.0.0.0``, ``[::]``: a bind address, not somewhere to call), link-local
    ones (``169.254.0.0/16``, ``fe80::/10``) and the cloud metadata services,
    multicast and broadcast.
``listen_address``
    where a server listens (``kernel.address``, ``kernel.control``, a
    plugin's): ``host:port`` with the host given (an IP literal, ``[v6]``,
    or a host name; ``0.0.0.0`` and ``[::]`` allowed) and a port 0-65535 (0:
    any free port), or ``unix:/absolute/path`` (at most 107 bytes, no
    whitespace or control characters). ``:7420``, ``localhost`` (no port),
    ``:99999``, ``:-5`` and ``unix:sock`` (relative to whatever directory
    the kernel was started in) are refused, each saying what to write.
``local_address``
    an ``address`` on this host: a loopback IP (``127.0.0.0/8``, ``[::1]``)
    or ``localhost``, or a unix socket inside given directories.
``interface_name``
    a protobuf service's full name, ``package.Service``:
    ``[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)+``, at most
    :data:`MAX_NAME` characters.
``unit_name``
    what a deployment accepts as a unit's name: ``[a-z0-9][a-z0-9_-]*``, at
    most :data:`MAX_UNIT` characters.
``instance_id``
    ``[A-Za-z0-9_][A-Za-z0-9_.-]*``, at most :data:`MAX_ID` characters.
``text``
    printable text: no control, format or line-separator characters.
``weight``
    a routing weight (the ``weight`` label): an integer 1 to :data:`MAX_WEIGHT`
    (``ring_hash`` puts 100 points on its ring per unit of weight).
``labels``
    at most :data:`MAX_LABELS` pairs; keys ``[A-Za-z0-9]([A-Za-z0-9_./-]*[A-Za-z0-9])?``
    of at most :data:`MAX_LABEL_KEY` characters, values ``text`` of at most
    :data:`MAX_LABEL_VALUE`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from hsu.errors import InvalidValue, OverLimit

__all__ = [
    "MAX_ADDRESS",
    "MAX_ID",
    "MAX_LABELS",
    "MAX_LABEL_KEY",
    "MAX_LABEL_VALUE",
    "MAX_NAME",
    "MAX_TEXT",
    "MAX_TOPIC",
    "MAX_TOPIC_PATTERNS",
    "MAX_UNIT",
    "MAX_VERSION",
    "MAX_WEIGHT",
    "RateLimit",
    "address",
    "instance_id",
    "interface_name",
    "labels",
    "listen_address",
    "local_address",
    "shown",
    "text",
    "topic",
    "topic_patterns",
    "unit_name",
    "unix_path",
    "version",
    "weight",
]

#: the longest address accepted
MAX_ADDRESS = 256
#: the longest interface (protobuf service) name accepted
MAX_NAME = 256
#: the longest unit name accepted
MAX_UNIT = 63
#: the longest instance id accepted
MAX_ID = 128
#: the longest free text (``text``'s default)
MAX_TEXT = 256
#: the longest version string
MAX_VERSION = 64
#: at most this many labels (metadata pairs)
MAX_LABELS = 32
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
#: the longest event topic
MAX_TOPIC = 128
#: at most this many topic patterns in one subscription
MAX_TOPIC_PATTERNS = 32
#: the largest routing weight
MAX_WEIGHT = 100
#: a unix socket's path fits in sun_path (108 bytes with its NUL)
MAX_UNIX_PATH = 107

_INTERFACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_UNIT = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TOPIC = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_TOPIC_PATTERN = re.compile(r"[a-z0-9_*?-]+(?:\.[a-z0-9_*?-]+)*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_./-]*[A-Za-z0-9])?")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_UNIX_PATH = re.compile(r"/[A-Za-z0-9._/+@=,~-]*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
#: cloud metadata services outside the link-local range, by address and name
_METADATA_IPS = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "fd20:ce::254")
)
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "instance-data"})
#: Unicode categories never accepted: control, format (bidi overrides, ...),
#: line and paragraph separators, surrogates, unassigned
_NEVER = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters: safe in one log line."""
    r = repr(value)
    if len(r) <= limit:
        return r
    size = f" ({len(value)} characters)" if isinstance(value, str | bytes) else ""
    return f"{r[: limit - 3]}...{size}"


def _fail(field: str, why: str, value: object) -> InvalidValue:
    return InvalidValue(f"{field}: {why} (got {shown(value)})")


def _str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"{field}: expected a string, got {type(value).__name__}")
    return value


def text(value: str, *, field: str, max_len: int = MAX_TEXT, required: bool = False) -> str:
    """Printable text of at most ``max_len`` characters (empty unless ``required``)."""
    value = _str(value, field)
    if len(value) > max_len:
        raise _fail(field, f"longer than {max_len} characters", value)
    if required and not value:
        raise InvalidValue(f"{field}: is required")
    for ch in value:
        if unicodedata.category(ch) in _NEVER:
            raise _fail(field, f"contains the character {ch!r}", value)
    return value


def version(value: str, *, field: str = "version") -> str:
    """A version: printable text of at most :data:`MAX_VERSION` characters."""
    return text(value, field=field, max_len=MAX_VERSION)


def _name(value: str, field: str, pattern: re.Pattern[str], max_len: int, what: str) -> str:
    value = _str(value, field)
    if not value:
        raise InvalidValue(f"{field}: is required")
    if len(value) > max_len:
        raise _fail(field, f"longer than {max_len} characters", value)
    if not pattern.fullmatch(value):
        raise _fail(field, f"not {what}", value)
    return value


def interface_name(value: str, *, field: str = "interface") -> str:
    """A protobuf service's full name, such as ``hsu.echo.v1.Echo``."""
    return _name(value, field, _INTERFACE, MAX_NAME, "a service's full name (package.Service)")


def unit_name(value: str, *, field: str = "unit") -> str:
    """A unit's name: lower-case letters, digits, ``_`` and ``-``."""
    return _name(
        value, field, _UNIT, MAX_UNIT, "a unit name of lower-case letters, digits, '_' and '-'"
    )


def instance_id(value: str, *, field: str = "instance_id") -> str:
    """An instance id (``<unit>-<hex>`` when the kernel makes it)."""
    return _name(value, field, _ID, MAX_ID, "an id of letters, digits, '_', '.' and '-'")


def topic(value: str, *, field: str = "topic") -> str:
    """An event topic: dot-separated words of ``a-z0-9_-`` (``worker.started``)."""
    return _name(
        value, field, _TOPIC, MAX_TOPIC, "a topic of dot-separated words of a-z, 0-9, '_' and '-'"
    )


def topic_patterns(values: Iterable[str], *, field: str = "topics") -> tuple[str, ...]:
    """Topic names or globs (``worker.*``, ``*``): a bounded count, each a
    topic whose words may hold ``*`` and ``?``."""
    found = tuple(values)
    if len(found) > MAX_TOPIC_PATTERNS:
        raise InvalidValue(f"{field}: {len(found)} patterns; at most {MAX_TOPIC_PATTERNS}")
    for i, value in enumerate(found):
        _name(value, f"{field}[{i}]", _TOPIC_PATTERN, MAX_TOPIC, "a topic or a glob of one")
    return found


def labels(
    value: Mapping[str, str],
    *,
    field: str = "metadata",
    max_count: int = MAX_LABELS,
    max_key: int = MAX_LABEL_KEY,
    max_value: int = MAX_LABEL_VALUE,
) -> dict[str, str]:
    """String pairs: a bounded count, keys of a label grammar, printable values."""
    if len(value) > max_count:
        raise InvalidValue(f"{field}: {len(value)} entries; at most {max_count}")
    out: dict[str, str] = {}
    for key, item in value.items():
        _name(key, f"{field} key", _LABEL_KEY, max_key, "a key of letters, digits and _./-")
        out[key] = text(item, field=f"{field}[{key}]", max_len=max_value)
    return out


def weight(value: int | str, *, field: str = "weight") -> int:
    """A routing weight, 1 to :data:`MAX_WEIGHT` (a label's decimal text too)."""
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,4}", value):
            raise _fail(field, f"not an integer 1 to {MAX_WEIGHT}", value)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise _fail(field, f"not an integer 1 to {MAX_WEIGHT}", value)
    return value


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _split(value: str, field: str) -> tuple[str, str | None]:
    """``(path, None)`` for ``unix:``; ``(host, port)`` else; syntax only."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]  # unix:///abs is unix:/abs
        if not _UNIX_PATH.fullmatch(path):
            raise _fail(
                field, "not unix:/absolute/path (letters, digits and ._/+@=,~- only)", value
            )
        if "/../" in f"{path}/" or "/./" in f"{path}/":
            raise _fail(field, "a unix path with . or .. in it", value)
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise _fail(field, f"a unix path longer than {MAX_UNIX_PATH} bytes", value)
        return path, None
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _fail(field, "not host:port (port 1-65535) or unix:/absolute/path", value)
    if "%" in host:
        raise _fail(field, "an IPv6 zone (%) is not accepted", value)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _fail(field, "not an IPv6 address in brackets", value) from None
        return host[1:-1], port
    if _ip(host) is not None:
        if ":" in host:
            raise _fail(field, "an IPv6 address needs brackets: [v6]:port", value)
        return host, port
    parts = host.split(".")
    if (
        len(host) > 253
        or not all(_HOSTNAME.fullmatch(p) for p in parts)
        # "127.1", "0x7f.1", "2852039166": what inet_aton reads as an IP
        or not parts[-1][0].isalpha()
    ):
        raise _fail(field, "not an IP address or a host name (letters, digits, - and .)", value)
    return host, port


def address(value: str, *, field: str = "address") -> str:
    """A gRPC address one may call: ``host:port`` or ``unix:/absolute/path``.

    Refuses the unspecified address, link-local and metadata-service
    addresses, multicast and broadcast (see the module's docstring).
    """
    value = _str(value, field)
    if not value:
        raise InvalidValue(f"{field}: is required")
    if len(value) > MAX_ADDRESS:
        raise _fail(field, f"longer than {MAX_ADDRESS} characters", value)
    host, port = _split(value, field)
    if port is None:
        return value
    ip = _ip(host)
    if ip is None:
        if host.lower().rstrip(".") in _METADATA_NAMES:
            raise _fail(field, "a cloud metadata service", value)
        return value
    if ip in _METADATA_IPS:
        raise _fail(field, "a cloud metadata service", value)
    if ip.is_unspecified:
        raise _fail(field, "the unspecified address (where to listen, not where to call)", value)
    if ip.is_link_local:
        raise _fail(field, "a link-local address (where cloud metadata services listen)", value)
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise _fail(field, "a multicast or broadcast address", value)
    return value


def listen_address(value: str, *, field: str = "address") -> str:
    """Where a server listens; see the module's docstring. Raises
    :class:`~hsu.errors.InvalidValue` saying what is wrong and what to write."""
    value = _str(value, field)
    example = "write HOST:PORT (127.0.0.1:7420) or unix:/absolute/path"
    if not value:
        raise InvalidValue(f"{field}: is required; {example}")
    if len(value) > MAX_ADDRESS:
        raise _fail(field, f"longer than {MAX_ADDRESS} characters", value)
    if any(c.isspace() or unicodedata.category(c) in _NEVER for c in value):
        raise _fail(field, "whitespace or a control character", value)
    path = unix_path(value)
    if path is not None:
        if not path.startswith("/"):
            raise _fail(
                field,
                "a unix socket needs an absolute path (a relative one would be taken from"
                " the directory the kernel was started in): unix:/path/to/socket",
                value,
            )
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise _fail(field, f"a unix path longer than {MAX_UNIX_PATH} bytes", value)
        return value
    host, sep, port = value.rpartition(":")
    if not sep or (host and host.startswith("[") and not host.endswith("]")):
        raise _fail(field, f"no port; {example}", value)
    if not port.isdigit():
        raise _fail(field, f"port {port!r} is not a number 0-65535; {example}", value)
    if int(port) > 65535:
        raise _fail(field, f"port {int(port)} is out of range 0-65535", value)
    if not host:
        raise _fail(
            field,
            f"no host; write 127.0.0.1:{port} (this machine only) or 0.0.0.0:{port}"
            " (every interface)",
            value,
        )
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if _ip(bare) is not None:
        if ":" in bare and bare == host:
            raise _fail(field, f"an IPv6 address needs brackets: [{host}]:{port}", value)
        return value
    if not all(_HOSTNAME.fullmatch(p) for p in host.split(".")) or len(host) > 253:
        raise _fail(field, "not an IP address or a host name (letters, digits, - and .)", value)
    return value


def unix_path(value: str) -> str | None:
    """The path of a ``unix:`` address (``None`` for ``host:port``); not checked."""
    if not value.startswith("unix:"):
        return None
    path = value[len("unix:") :]
    return path[2:] if path.startswith("//") else path


def local_address(
    value: str,
    *,
    field: str = "address",
    dirs: Iterable[str | Path] = (),
    also: Iterable[str] = (),
    never: Iterable[str] = (),
) -> str:
    """An :func:`address` on this host: loopback, or a unix socket in ``dirs``.

    ``also`` lists addresses accepted as they are (declared in a config, say);
    ``never`` lists addresses refused whatever they are (the caller's own).
    A unix path counts as in a directory once symlinks are resolved.
    """
    value = address(value, field=field)
    if value in set(never):
        raise _fail(field, "an address of the kernel itself", value)
    if value in set(also):
        return value
    path = unix_path(value)
    if path is None:
        host = value.rpartition(":")[0].strip("[]")
        ip = _ip(host)
        if host.lower() == "localhost" or (ip is not None and ip.is_loopback):
            return value
        raise _fail(field, "not on this host (a loopback address or a unix socket)", value)
    real = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(d)) for d in dirs]
    if any(real.is_relative_to(d) for d in allowed):
        return value
    where = ", ".join(str(d) for d in allowed) or "no directory"
    raise _fail(field, f"a unix socket outside {where}", value)


class RateLimit:
    """A token bucket: ``rate`` calls a second on average, ``burst`` at once.

    ``allow()`` takes a token if there is one; ``check(what)`` raises
    :class:`hsu.errors.OverLimit` when there is none.
    """

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float):
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"RateLimit: rate > 0 and burst >= 1, got {rate!r}, {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def allow(self) -> bool:
        """Take one token; False when the bucket is empty."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def check(self, what: str) -> None:
        """Take one token or raise :class:`OverLimit` naming ``what``."""
        if not self.allow():
            raise OverLimit(
                f"{what}: more than {self.rate:g} a second (burst {self.burst:g}); try again later"
            )
