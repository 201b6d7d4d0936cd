"""Who connects to the unix control socket (``SO_PEERCRED``), for auth.

grpcio does not tell a servicer who is at the other end of a unix socket:
``context.peer()`` is ``unix:`` and the auth context says nothing. So with
auth on and a unix control socket, the kernel listens on the control socket
itself (:class:`PeerProxy`, asyncio), reads each connection's peer
credentials as it accepts it, and pipes the bytes both ways to the control
plane's gRPC server, which listens on a second unix socket in the kernel's
0700 state dir (only this user and root can open it).

Each piped connection reaches the gRPC server from a client socket bound to
a fresh random abstract address, which grpcio reports as the call's peer
(``unix-abstract:hsu-pc-<random>``); :attr:`PeerProxy.peers` maps that peer
to the credentials, and the auth gate hands them to authenticators as
:attr:`hsu.ports.CallInfo.peer_credentials`. A connection made straight to
the internal socket has no entry: no credentials. An entry is added before
its connection is made and removed before its address is released, so a
peer string never names another connection's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import stat
import struct
import tempfile
from pathlib import Path

from loguru import logger

from hsu._kernel.control import MAX_UNIX_PATH, prepare_socket, unix_path
from hsu.errors import HsuError
from hsu.ports import PeerCredentials

#: at most this many proxied connections at once
MAX_CONNECTIONS = 256
#: the last this many of them are kept for the kernel's own user and root
RESERVED = 32
#: at most this many at once from any other one uid
MAX_PER_UID = 32
#: bytes buffered towards one side before the other side's reading pauses
HIGH_WATER = 256 * 1024
#: ``SO_PEERGROUPS`` (Linux 4.13); Python does not name it
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: the most supplementary groups read for one peer
MAX_GROUPS = 256
#: the internal socket's name in the state dir
INTERNAL_NAME = "control-grpc.sock"
#: the prefix of the abstract addresses the proxy connects from
PEER_PREFIX = "hsu-pc-"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connected unix socket's peer: pid, uid, gid (``SO_PEERCRED``) and
    supplementary groups (``SO_PEERGROUPS``, empty where unsupported)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):
        found = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
        groups = struct.unpack(f"{len(found) // 4}I", found[: len(found) // 4 * 4])
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=groups)


def internal_socket(state_dir: Path) -> tuple[str, Path | None]:
    """Where the control plane's gRPC server listens behind the proxy:
    ``unix:<state dir>/control-grpc.sock``, or, when that path is too long
    for a socket, one in a fresh private temporary directory (returned, to
    be removed at the end)."""
    path = state_dir.absolute() / INTERNAL_NAME
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        return f"unix:{path}", None
    made = Path(tempfile.mkdtemp(prefix="hsu-"))  # 0700, this user's
    return f"unix:{made / INTERNAL_NAME}", made


class _Side(asyncio.Protocol):
    """One end of a pipe: what it reads, the other end writes."""

    def __init__(self, pipe: _Pipe):
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.pipe.made(self)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)

    def eof_received(self) -> bool:
        self.pipe.close()  # gRPC does not half-close: the end of one is the end
        return False

    def pause_writing(self) -> None:
        # this end's buffer is full: stop reading the other end until it drains
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self)


class _Pipe:
    """One accepted connection and its connection to the gRPC server."""

    def __init__(self, proxy: PeerProxy):
        self.proxy = proxy
        self.down = _Side(self)
        self.up = _Side(self)
        self.down.other, self.up.other = self.up, self.down
        self.creds: PeerCredentials | None = None
        self.peer = ""
        self.closed = False
        #: connecting to the gRPC server (its task)
        self.task: asyncio.Task[None] | None = None

    def made(self, side: _Side) -> None:
        if side is self.down:
            self.proxy.accepted(self)

    def close(self) -> None:
        """Close both ends (what is buffered is written first)."""
        self.closed = True
        for side in (self.down, self.up):
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        self.closed = True
        for side in (self.down, self.up):
            if side.transport is not None:
                side.transport.abort()

    def lost(self, side: _Side) -> None:
        if side is self.up:
            # before the socket (and its address) is released
            self.proxy.peers.pop(self.peer, None)
        self.close()
        side.transport = None
        self.settle()

    def settle(self) -> None:
        """Forget the pipe once both ends are gone and nothing connects."""
        done = self.task is None or self.task.done() or self.task is asyncio.current_task()
        if self.down.transport is None and self.up.transport is None and done:
            self.proxy.forget(self)


class PeerProxy:
    """Listens on the public control socket and pipes each connection to
    the gRPC server on ``internal``, noting who made it (see the module)."""

    def __init__(self, public: str, internal: str):
        self.public = public
        self.internal = internal
        #: the gRPC peer string of each piped connection -> its credentials
        self.peers: dict[str, PeerCredentials] = {}
        self.pipes: set[_Pipe] = set()
        self._per_uid: dict[int, int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._refused = 0
        self._own = {0, os.geteuid()}

    async def start(self, mode: int = 0o600, group: int | None = None) -> None:
        """Listen on the public socket (prepared by the caller) and give it
        ``mode`` (and ``group``), whatever the umask."""
        path = unix_path(self.public)
        assert path is not None
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(
                lambda: _Pipe(self).down, path, backlog=128
            )
        except OSError as exc:
            raise HsuError(f"kernel.control: cannot listen on {path}: {exc.strerror}") from None
        self._inode = os.lstat(path).st_ino
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError as exc:
            raise HsuError(
                f"kernel.control: cannot give {path} mode {mode:04o}"
                f"{f' and group {group}' if group is not None else ''}: {exc.strerror}"
            ) from None

    def accepted(self, pipe: _Pipe) -> None:
        down = pipe.down.transport
        assert down is not None
        sock = down.get_extra_info("socket")
        try:
            creds = peer_credentials(sock)
        except OSError:
            down.abort()
            return
        own = creds.uid in self._own
        held = self._per_uid.get(creds.uid, 0)
        if len(self.pipes) >= MAX_CONNECTIONS or (
            not own and (len(self.pipes) >= MAX_CONNECTIONS - RESERVED or held >= MAX_PER_UID)
        ):
            self._refuse(creds)
            down.abort()
            return
        pipe.creds = creds
        self.pipes.add(pipe)
        self._per_uid[creds.uid] = held + 1
        down.pause_reading()  # until the other end is connected
        pipe.task = asyncio.get_running_loop().create_task(
            self._connect(pipe), name="hsu-peercred-connect"
        )

    def _refuse(self, creds: PeerCredentials) -> None:
        self._refused += 1
        if self._refused == 1 or self._refused % 1000 == 0:
            logger.warning(
                "control socket: {} connection(s) refused so far (at most {} at once, {} per"
                " other user); the last from uid {}",
                self._refused,
                MAX_CONNECTIONS,
                MAX_PER_UID,
                creds.uid,
            )

    async def _connect(self, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        path = unix_path(self.internal)
        assert path is not None and pipe.creds is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            pipe.peer = self._bind(sock)
            self.peers[pipe.peer] = pipe.creds
            await loop.sock_connect(sock, path)
            await loop.create_unix_connection(lambda: pipe.up, sock=sock)
        except (OSError, asyncio.CancelledError) as exc:
            self.peers.pop(pipe.peer, None)
            sock.close()
            pipe.abort()
            if isinstance(exc, OSError):
                logger.warning("control socket: cannot reach the control server: {}", exc)
            pipe.settle()
            return
        if pipe.closed or pipe.down.transport is None:
            pipe.close()
            pipe.settle()
            return
        pipe.down.transport.resume_reading()

    @staticmethod
    def _bind(sock: socket.socket) -> str:
        """Bind ``sock`` to a fresh abstract address; its gRPC peer string."""
        for _ in range(8):
            name = f"{PEER_PREFIX}{os.urandom(12).hex()}"
            try:
                sock.bind(f"\0{name}")
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            return f"unix-abstract:{name}"
        raise OSError(errno.EADDRINUSE, "no free abstract address")

    def forget(self, pipe: _Pipe) -> None:
        if pipe not in self.pipes:
            return
        self.pipes.discard(pipe)
        assert pipe.creds is not None
        left = self._per_uid.get(pipe.creds.uid, 1) - 1
        if left:
            self._per_uid[pipe.creds.uid] = left
        else:
            self._per_uid.pop(pipe.creds.uid, None)

    def stop_listening(self) -> None:
        """No new connections (those open keep working); the socket file goes."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        path = unix_path(self.public)
        with contextlib.suppress(OSError):
            if path is not None and os.lstat(path).st_ino == self._inode:
                os.unlink(path)

    async def close(self) -> None:
        """Stop listening and close every piped connection."""
        self.stop_listening()
        tasks = [p.task for p in self.pipes if p.task is not None and not p.task.done()]
        for task in tasks:
            task.cancel()
        for pipe in list(self.pipes):
            pipe.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        # the transports call connection_lost on the next turns of the loop
        for _ in range(10):
            if not self.pipes:
                break
            await asyncio.sleep(0)
        self.peers.clear()


def prepare(public: str, state_dir: Path, widened: bool) -> None:
    """Before binding the public socket: its directory is private (0700,
    ours) unless ``widened`` lets other users open the socket; then the
    directory is left as it is, but must be ours or root's and writable by
    no one else (else another user could put a socket of their own in its
    place)."""
    path = unix_path(public)
    assert path is not None
    parent = Path(path).parent
    if not widened or parent.absolute() == state_dir.absolute():
        if widened:
            logger.warning(
                "the control socket may be opened by other users (socket_mode), but it is in"
                " {}, which only this user can enter; set kernel.control to unix:PATH in a"
                " directory they can reach",
                parent,
            )
        prepare_socket(public)
        return
    try:
        st = os.lstat(parent)
    except OSError as exc:
        raise HsuError(f"kernel.control: {parent}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise HsuError(f"kernel.control: {parent}: not a directory (a symlink is not trusted)")
    if st.st_uid not in (0, os.geteuid()):
        raise HsuError(
            f"kernel.control: {parent} is owned by uid {st.st_uid}; the control socket's"
            " directory must be this user's or root's"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise HsuError(
            f"kernel.control: {parent} is writable by other users (mode"
            f" {stat.S_IMODE(st.st_mode):04o}); they could replace the control socket"
        )
    prepare_socket(public, private_dir=False)


def cleanup(internal: str, made: Path | None) -> None:
    """Remove the internal socket, and the directory :func:`internal_socket` made."""
    path = unix_path(internal)
    with contextlib.suppress(OSError):
        if path is not None and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
