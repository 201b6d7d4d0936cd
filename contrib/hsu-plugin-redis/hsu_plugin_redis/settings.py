"""The ``redis`` section of a deployment, and the client it describes."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Any

import attrs

#: what a key prefix may be: it starts every key the plugin writes
_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


def parse_address(value: str) -> tuple[str, int] | str:
    """``(host, port)`` for ``host:port`` (``[v6]:port``), or the socket's path
    for ``unix:/path``. Raises ValueError saying what a good one looks like
    (the kernel's error puts ``redis.address`` before it)."""
    if not isinstance(value, str) or not value:
        raise ValueError("empty; give host:port (127.0.0.1:6379) or unix:/path")
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{value!r}: a unix socket's path must be absolute")
        if len(path.encode()) > 107:
            raise ValueError(f"{value!r}: over the 107 bytes a unix socket path may have")
        return path
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (127.0.0.1:6379, [::1]:6379) or unix:/path")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{value!r}: an IPv6 host goes in brackets, [::1]:6379")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: put an IPv6 host in brackets, [::1]:6379")
    return host, int(port)


def _address(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    parse_address(value)


def _prefix(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _PREFIX.fullmatch(value):
        raise ValueError(f"{value!r} is not 1 to 64 of letters, digits and '_.:{{}}-' (like hsu:)")


def _password_file(_: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not os.path.isabs(value):
        raise ValueError(f"{value!r} must be an absolute path")


@attrs.frozen
class RedisSettings:
    """The ``redis`` section. Every field has a default."""

    #: the server: ``host:port`` (``[::1]:6379``) or ``unix:/path/to/redis.sock``
    address: str = attrs.field(default="127.0.0.1:6379", validator=_address)
    #: the database number (``SELECT``)
    db: int = attrs.field(default=0, validator=[attrs.validators.ge(0), attrs.validators.le(65535)])
    #: starts every key hsu writes, so several deployments can share a server
    prefix: str = attrs.field(default="hsu:", validator=_prefix)
    #: seconds to connect
    connect_timeout: float = attrs.field(
        default=2.0, validator=[attrs.validators.gt(0), attrs.validators.le(300)]
    )
    #: seconds one command may take
    timeout: float = attrs.field(
        default=5.0, validator=[attrs.validators.gt(0), attrs.validators.le(300)]
    )
    #: revisions of changes kept for a watch that resumes from a revision
    history: int = attrs.field(default=10000, validator=attrs.validators.ge(1))
    #: ACL user (``AUTH user password``); None: the default user
    username: str | None = None
    #: a file (owner-only) holding the password; None: no AUTH
    password_file: str | None = attrs.field(default=None, validator=_password_file)

    def describe(self) -> str:
        """The server, for messages: ``redis://host:port/db`` or ``unix:/path``."""
        where = parse_address(self.address)
        if isinstance(where, str):
            return f"redis+unix:{where}?db={self.db}"
        host, port = where
        host = f"[{host}]" if ":" in host else host
        return f"redis://{host}:{port}/{self.db}"

    def password(self) -> str | None:
        """The password from ``password_file`` (checked: a regular file no one
        else may read), or None."""
        if self.password_file is None:
            return None
        from hsu.errors import StorageError

        path = Path(self.password_file)
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
                raise StorageError(
                    f"redis.password_file: {path} must be a regular file only its owner may"
                    " read (chmod 600)"
                )
            return path.read_text().strip()
        except OSError as exc:
            raise StorageError(f"redis.password_file: {path}: {exc.strerror}") from None

    def client_kwargs(self) -> dict[str, Any]:
        """Arguments for ``redis.asyncio.Redis``: no retries (a retried write
        could be applied twice, a retried compare-and-set reported refused after
        it was done), bytes in and out."""
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        where = parse_address(self.address)
        kw: dict[str, Any] = {
            "db": self.db,
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            "decode_responses": False,
            "username": self.username,
            "password": self.password(),
        }
        if isinstance(where, str):
            kw["unix_socket_path"] = where
        else:
            kw["host"], kw["port"] = where
            # with maintenance notifications on (redis-py's "auto"), the pool
            # skips its check that a pooled connection is still open, and a put
            # on a connection the server closed fails as "may have been made"
            # instead of "nothing was written"
            try:
                from redis.maint_notifications import MaintNotificationsConfig
            except ImportError:  # an older redis-py: it has no such notifications
                pass
            else:
                kw["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        return kw
