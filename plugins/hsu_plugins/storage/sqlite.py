"""``sqlite``: the default storage, one SQLite file in the kernel's state dir.

::

    kernel: {storage: sqlite}     # the default
    sqlite:
      path: null                  # default <state_dir>/storage.sqlite3
      max_bytes: null             # refuse writes that would grow the file past this

WAL journal, ``synchronous=FULL``: a put returns once its transaction is
fsynced, so a kernel SIGKILLed (or a machine that loses power) right after
keeps every acknowledged write. Every statement runs on one thread of the
storage's own, never on the event loop. One revision counter for the file,
a history of recent changes for watchers (``history`` changes), TTLs swept
once a second. The file is created 0600 and, when opened, must be a regular
file this user owns that no one else can write; a file that is not, or is
not a database this version reads, is an error naming it
(:class:`hsu.errors.StorageError`). A full disk (or ``max_bytes``) fails
the write with an error naming the file, and the transaction rolls back: what
was there stays. docs/storage.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import attrs

import hsu
from hsu.errors import StorageError
from hsu.ports import (
    KernelAPI,
    KeyValue,
    Register,
    Storage,
    StorageCompacted,
    StorageEvent,
    StorageSettings,
)
from hsu.storage import (
    WatchHub,
    check_key,
    check_namespace,
    check_ttl,
    check_value,
    key_range,
)

T = TypeVar("T")
_Changes = list[tuple[str, StorageEvent]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL,
    expires REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires > 0;
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER PRIMARY KEY, ns TEXT NOT NULL, key BLOB NOT NULL, kind TEXT NOT NULL,
    value BLOB NOT NULL, create_rev INTEGER NOT NULL, version INTEGER NOT NULL,
    expires REAL NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0), ('format', 1);
"""

#: sweeps for keys whose TTL ran out at most this often (seconds); with no
#: key that has a TTL it does not sweep at all (an idle kernel is not woken)
SWEEP_EVERY = 1.0


@attrs.frozen
class SqliteSettings:
    """The ``sqlite`` section."""

    #: the database file; relative to the state dir; default ``storage.sqlite3`` there
    path: str | None = None
    #: refuse a write that would grow the file past this many bytes (the
    #: error a full disk gives); None: as large as the disk allows
    max_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(65536))
    )
    #: recent changes kept for a watcher that resumes from a revision
    history: int = attrs.field(default=10000, validator=attrs.validators.ge(1))


def _kv(row: Sequence[Any]) -> KeyValue:
    key, value, create_rev, mod_rev, version, expires = row
    return KeyValue(bytes(key).decode("utf-8", "surrogatepass"), bytes(value), create_rev,
                    mod_rev, version, expires)  # fmt: skip


class SqliteStorage:
    """:class:`hsu.ports.Storage` in one SQLite file (WAL, fsync per commit)."""

    def __init__(
        self,
        path: Path,
        *,
        max_value_bytes: int = StorageSettings().max_value_bytes,
        max_bytes: int | None = None,
        history: int = 10000,
    ) -> None:
        self.path = path
        self._max_value = max_value_bytes
        self._max_bytes = max_bytes
        self._history = history
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hsu-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._broken: StorageError | None = None
        self._hub = WatchHub()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: set by a put with a TTL: the sweeper looks at the next expiry again
        self._expiry_changed: asyncio.Event | None = None
        self._closed = False
        #: changes of the transaction in progress (storage thread only)
        self._pending: _Changes = []

    @property
    def max_value_bytes(self) -> int:
        return self._max_value

    @property
    def describe(self) -> str:
        return str(self.path)

    # -- the thread -----------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StorageError(f"{self.path}: the storage is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._expiry_changed = asyncio.Event()
            self._sweeper = loop.create_task(self._sweep())
        return await loop.run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._open()
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.rollback()
            raise self._error(exc) from None

    def _error(self, exc: sqlite3.Error) -> StorageError:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            cap = f" (or sqlite.max_bytes, {self._max_bytes})" if self._max_bytes else ""
            return StorageError(f"{self.path}: the disk is full{cap}; nothing was written")
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            self._broken = StorageError(
                f"{self.path}: not a storage file this version reads ({exc}); move it"
                " away to start with an empty storage"
            )
            return self._broken
        return StorageError(f"{self.path}: {exc}")

    def _open(self) -> sqlite3.Connection:
        if self._broken is not None:
            raise self._broken
        if self._conn is not None:
            return self._conn
        try:
            self._conn = self._connect()
        except StorageError as exc:
            self._broken = exc
            raise
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            why = "a symlink" if os.path.islink(self.path) else exc.strerror
            raise StorageError(f"{self.path}: cannot open the storage file: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{self.path}: the storage file is not a regular file")
            if st.st_uid != os.geteuid():
                raise StorageError(
                    f"{self.path}: the storage file is owned by uid {st.st_uid}, not by"
                    f" this kernel's user ({os.geteuid()}); not opened"
                )
            os.fchmod(fd, 0o600)  # what it holds is the deployment's alone
        finally:
            os.close(fd)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"{self.path}: cannot use WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            conn.executescript(SCHEMA)
            if self._max_bytes is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count={max(1, self._max_bytes // page)}")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- reads ------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> KeyValue | None:
        ns, raw = check_namespace(namespace), check_key(key)
        now = time.time()

        def read(conn: sqlite3.Connection) -> KeyValue | None:
            row = conn.execute(
                "SELECT key, value, create_rev, mod_rev, version, expires FROM kv"
                " WHERE ns = ? AND key = ? AND (expires = 0 OR expires > ?)",
                (ns, raw, now),
            ).fetchone()
            return _kv(row) if row else None

        return await self._run(read)

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        ns = check_namespace(namespace)
        start, end = key_range(check_key(prefix, field="prefix", empty=True))
        now = time.time()

        def read(conn: sqlite3.Connection) -> tuple[list[KeyValue], int]:
            q = (
                "SELECT key, value, create_rev, mod_rev, version, expires FROM kv"
                " WHERE ns = ? AND key >= ? AND (expires = 0 OR expires > ?)"
            )
            args: list[Any] = [ns, start, now]
            if end is not None:
                q += " AND key < ?"
                args.append(end)
            q += " ORDER BY key"
            if limit > 0:
                q += " LIMIT ?"
                args.append(limit)
            conn.execute("BEGIN")
            try:
                rows = conn.execute(q, args).fetchall()
                rev = self._revision(conn)
            finally:
                conn.execute("COMMIT")
            return [_kv(r) for r in rows], rev

        return await self._run(read)

    @staticmethod
    def _revision(conn: sqlite3.Connection) -> int:
        value: int = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
        return value

    # -- writes -----------------------------------------------------------------

    def _write(self, conn: sqlite3.Connection, body: Callable[[sqlite3.Connection, int], T]) -> T:
        """One transaction that moves the revision on: durable at COMMIT."""
        conn.execute("BEGIN IMMEDIATE")
        rev = self._revision(conn) + 1
        result = body(conn, rev)
        conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        if rev % 64 == 0:
            floor = rev - self._history
            if floor > 0:
                conn.execute("DELETE FROM events WHERE rev <= ?", (floor,))
                conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (floor,))
        conn.execute("COMMIT")
        return result

    def _put_row(
        self, conn: sqlite3.Connection, ns: str, raw: bytes, value: bytes, rev: int,
        expires: float, now: float,
    ) -> KeyValue:  # fmt: skip
        row = conn.execute(
            "SELECT create_rev, version, expires FROM kv WHERE ns = ? AND key = ?", (ns, raw)
        ).fetchone()
        if row is None or (row[2] and row[2] <= now):
            create_rev, version = rev, 1
        else:
            create_rev, version = row[0], row[1] + 1
        conn.execute(
            "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ns, raw, value, create_rev, rev, version, expires),
        )
        kv = KeyValue(raw.decode("utf-8", "surrogatepass"), value, create_rev, rev, version,
                      expires)  # fmt: skip
        self._event(conn, ns, "put", kv, rev)
        return kv

    def _delete_row(self, conn: sqlite3.Connection, ns: str, raw: bytes, rev: int) -> None:
        conn.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (ns, raw))
        kv = KeyValue(raw.decode("utf-8", "surrogatepass"), b"", 0, rev, 0)
        self._event(conn, ns, "delete", kv, rev)

    def _event(self, conn: sqlite3.Connection, ns: str, kind: str, kv: KeyValue, rev: int) -> None:
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rev, ns, kv.key.encode("utf-8", "surrogatepass"), kind, kv.value,
             kv.create_revision, kv.version, kv.expires_at),
        )  # fmt: skip
        # delivered after the commit, in revision order, on the event loop
        self._pending.append((ns, StorageEvent(kind, kv, rev)))

    def _committed(self) -> None:
        """On the storage thread, after a commit: hand the changes to the loop."""
        events, self._pending = self._pending, []
        if events and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: _Changes) -> None:
        for ns, event in events:
            self._hub.publish(ns, event)

    def _transact(
        self, body: Callable[[sqlite3.Connection, int], T]
    ) -> Callable[[sqlite3.Connection], T]:
        def run(conn: sqlite3.Connection) -> T:
            self._pending = []
            try:
                result = self._write(conn, body)
            except BaseException:
                self._pending = []
                raise
            self._committed()
            return result

        return run

    async def put(
        self, namespace: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> KeyValue:
        ns, raw = check_namespace(namespace), check_key(key)
        data, ttl = check_value(value, self._max_value), check_ttl(ttl)
        now = time.time()
        expires = now + ttl if ttl else 0.0
        try:
            return await self._run(
                self._transact(
                    lambda conn, rev: self._put_row(conn, ns, raw, data, rev, expires, now)
                )
            )
        finally:
            if expires:
                self._expiry_set()

    async def delete(self, namespace: str, key: str) -> int:
        ns, raw = check_namespace(namespace), check_key(key)

        def exists(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "SELECT 1 FROM kv WHERE ns = ? AND key = ? AND (expires = 0 OR expires > ?)",
                    (ns, raw, time.time()),
                ).fetchone()
                is not None
            )

        def body(conn: sqlite3.Connection, rev: int) -> int:
            if not exists(conn):
                raise _Nothing
            self._delete_row(conn, ns, raw, rev)
            return rev

        def run(conn: sqlite3.Connection) -> int:
            try:
                return self._transact(body)(conn)
            except _Nothing:
                conn.rollback()
                return 0

        return await self._run(run)

    async def compare_and_set(
        self,
        namespace: str,
        key: str,
        value: bytes | None,
        revision: int,
        *,
        ttl: float | None = None,
    ) -> tuple[bool, KeyValue | None]:
        ns, raw = check_namespace(namespace), check_key(key)
        data = None if value is None else check_value(value, self._max_value)
        ttl = check_ttl(ttl)
        if not isinstance(revision, int) or revision < 0:
            raise hsu.errors.InvalidValue(f"revision: must be an integer >= 0, got {revision!r}")
        now = time.time()

        def current(conn: sqlite3.Connection) -> KeyValue | None:
            row = conn.execute(
                "SELECT key, value, create_rev, mod_rev, version, expires FROM kv"
                " WHERE ns = ? AND key = ? AND (expires = 0 OR expires > ?)",
                (ns, raw, now),
            ).fetchone()
            return _kv(row) if row else None

        def body(conn: sqlite3.Connection, rev: int) -> tuple[bool, KeyValue | None]:
            now_kv = current(conn)
            if (now_kv.mod_revision if now_kv else 0) != revision:
                raise _Refused(now_kv)
            if data is None:
                if now_kv is None:
                    raise _Refused(None)
                self._delete_row(conn, ns, raw, rev)
                return True, None
            expires = now + ttl if ttl else 0.0
            return True, self._put_row(conn, ns, raw, data, rev, expires, now)

        def run(conn: sqlite3.Connection) -> tuple[bool, KeyValue | None]:
            try:
                return self._transact(body)(conn)
            except _Refused as refused:
                conn.rollback()
                return False, refused.kv

        try:
            return await self._run(run)
        finally:
            if ttl and data is not None:
                self._expiry_set()

    # -- TTLs -------------------------------------------------------------------

    def _expiry_set(self) -> None:
        if self._expiry_changed is not None:
            self._expiry_changed.set()

    async def _sweep(self) -> None:
        """Delete the keys whose TTL ran out (watchers see a delete): when the
        next one runs out (at most every ``SWEEP_EVERY``), and not at all while
        no key has a TTL, until a put gives one a TTL."""
        changed = self._expiry_changed
        assert changed is not None
        while not self._closed:
            changed.clear()
            try:
                due: float | None = await self._run(self._expire)
            except StorageError:
                due = time.time() + SWEEP_EVERY
            wait = None if due is None else max(due - time.time(), SWEEP_EVERY)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
            if due is not None and changed.is_set():
                # a new TTL: it may run out sooner; not sooner than SWEEP_EVERY
                await asyncio.sleep(SWEEP_EVERY)

    def _expire(self, conn: sqlite3.Connection) -> float | None:
        """Delete what has run out; when the next key runs out (None: no TTL)."""
        now = time.time()
        due = conn.execute(
            "SELECT ns, key FROM kv WHERE expires > 0 AND expires <= ? LIMIT 1000", (now,)
        ).fetchall()
        if due:
            self._delete_due(conn, due)
        nxt = conn.execute("SELECT MIN(expires) FROM kv WHERE expires > 0").fetchone()[0]
        return None if nxt is None else float(nxt)

    def _delete_due(self, conn: sqlite3.Connection, due: Sequence[Any]) -> None:

        def body(conn: sqlite3.Connection, rev: int) -> None:
            # one revision for the sweep, as etcd revokes a lease's keys at once
            for ns, raw in due:
                self._delete_row(conn, ns, bytes(raw), rev)

        self._transact(body)(conn)

    # -- watch ------------------------------------------------------------------

    async def watch(
        self, namespace: str, prefix: str = "", *, after: int = 0
    ) -> AsyncIterator[StorageEvent]:
        ns = check_namespace(namespace)
        start, end = key_range(check_key(prefix, field="prefix", empty=True))
        # opens the file (an error here names it) and starts the sweeper
        await self._run(self._revision)

        def backlog(conn: sqlite3.Connection) -> list[StorageEvent]:
            compacted = conn.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()[
                0
            ]
            if after < compacted:
                raise StorageCompacted(
                    f"{self.path}: revision {after} is compacted (the oldest kept is"
                    f" {compacted + 1}); list again and watch from its revision",
                    compacted + 1,
                )
            q = (
                "SELECT rev, kind, key, value, create_rev, version, expires FROM events"
                " WHERE rev > ? AND ns = ? AND key >= ?"
            )
            args: list[Any] = [after, ns, start]
            if end is not None:
                q += " AND key < ?"
                args.append(end)
            rows = conn.execute(q + " ORDER BY rev", args).fetchall()
            return [
                StorageEvent(kind, _kv((key, value, create_rev, rev, version, expires)), rev)
                for rev, kind, key, value, create_rev, version, expires in rows
            ]

        async for event in self._hub.watch(ns, prefix, after, lambda: self._run(backlog)):
            yield event

    # -- the end ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

        def shut() -> None:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)


class _Nothing(Exception):
    pass


class _Refused(Exception):
    def __init__(self, kv: KeyValue | None) -> None:
        self.kv = kv


def create(kernel: KernelAPI) -> Storage:
    """The storage factory: the file in the kernel's state dir."""
    own: SqliteSettings = kernel.settings("sqlite")
    common: StorageSettings = kernel.settings("storage")
    path = Path(own.path) if own.path else Path("storage.sqlite3")
    if not path.is_absolute():
        path = kernel.state_dir / path
    return SqliteStorage(
        path,
        max_value_bytes=common.max_value_bytes,
        max_bytes=own.max_bytes,
        history=own.history,
    )


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register("sqlite", SqliteSettings)


@hsu.hookimpl
def hsu_register_storages(register: Register[Callable[[KernelAPI], Storage]]) -> None:
    register("sqlite", create, default=True)
