"""``redis``: the storage on a Redis server (redis-py's asyncio client).

::

    kernel: {storage: redis}
    redis: {address: 127.0.0.1:6379, db: 0, prefix: "hsu:"}

Every change is one Lua script (``EVALSHA``), so it is atomic on the
server: it moves the store's one revision counter (``{prefix}rev``), writes
the key's hash (value, create and mod revisions, version, expiry), its
namespace's key index (a sorted set read with ``ZRANGEBYLEX``, so a list is
in key byte order) and appends the change to its namespace's stream, whose
entry ids are the revisions (``{rev}-{n}``). Compare-and-set is the same
script with a compare first: a script, not ``WATCH``/``MULTI``, because a
``WATCH`` transaction fails on any change to the key and needs a retry loop
and its own connection per attempt (three round trips or more), while the
script decides on the server in one. Watch reads the streams (``XREAD``),
not keyspace notifications: notifications are fire-and-forget pub/sub, with
no history to resume from a revision and nothing of the value or revision in
them, and one missed while a connection was down is gone.

A command that fails to reach the server raises
:class:`hsu.errors.StorageUnavailable` naming the server's address. The
client never retries (a retried put could be applied twice, a retried
compare-and-set reported refused after it was done); a write whose request
may have reached the server before the connection broke says so. Durability
is the server's: with ``appendonly yes`` and ``appendfsync always`` a write
is on disk before the server answers it. Redis Cluster is not supported (the
scripts touch keys of every namespace). docs/storage.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc
from loguru import logger

from hsu.errors import InvalidValue, StorageError, StorageUnavailable
from hsu.ports import KeyValue, StorageCompacted, StorageEvent, StorageSettings
from hsu.storage import check_key, check_namespace, check_ttl, check_value, key_range
from hsu_plugin_redis.settings import RedisSettings

T = TypeVar("T")
#: a script's or a pipeline's reply (``list`` is a method's name in the class)
_Reply = list[Any]

#: sweeps for keys whose TTL ran out this often (seconds)
SWEEP_EVERY = 1.0
#: keys one sweep deletes at most (one revision for them all)
SWEEP_BATCH = 500
#: stream entries one watch read takes at most
WATCH_BATCH = 512
#: milliseconds a watch's XREAD blocks before it looks again
WATCH_BLOCK_MS = 1000
#: the largest sequence part of a stream id
MAX_SEQ = 2**64 - 1

# KEYS: 1 rev, 2 the key's hash, 3 the namespace's index, 4 the ttl set, 5 the namespace's stream
# ARGV: 1 op (put|del), 2 expected mod revision ('-': no compare; 0: absent), 3 key,
#       4 value, 5 expires ('0': none), 6 now, 7 history, 8 the ttl set's member
# Reply: {1, rev, create_rev, version} done; {0, 0} refused, absent; {0, 0, v, c, m, ver, exp}
# refused, with the key as it is; {1, 0} a delete of a key that was not there.
WRITE = """
local cur = redis.call('HMGET', KEYS[2], 'v', 'c', 'm', 'ver', 'exp')
local live = cur[1] ~= false
if live then
  local e = tonumber(cur[5])
  if e > 0 and e <= tonumber(ARGV[6]) then live = false end
end
if ARGV[2] ~= '-' then
  local mod = 0
  if live then mod = tonumber(cur[3]) end
  if mod ~= tonumber(ARGV[2]) or (ARGV[1] == 'del' and not live) then
    if live then return {0, 0, cur[1], cur[2], cur[3], cur[4], cur[5]} end
    return {0, 0}
  end
end
if ARGV[1] == 'del' and not live then return {1, 0} end
local rev = redis.call('INCR', KEYS[1])
local id = string.format('%d-*', rev)
local floor = rev - tonumber(ARGV[7])
local xadd = {'XADD', KEYS[5]}
if floor > 0 then
  xadd[#xadd + 1] = 'MINID'
  xadd[#xadd + 1] = string.format('%d', floor)
end
xadd[#xadd + 1] = id
if ARGV[1] == 'del' then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[8])
  for _, f in ipairs({'t', 'delete', 'k', ARGV[3], 'v', '', 'c', '0', 'n', '0', 'e', '0'}) do
    xadd[#xadd + 1] = f
  end
  redis.call(unpack(xadd))
  return {1, rev, 0, 0}
end
local c, ver = rev, 1
if live then
  c = tonumber(cur[2])
  ver = tonumber(cur[4]) + 1
end
redis.call('HSET', KEYS[2], 'v', ARGV[4], 'c', c, 'm', rev, 'ver', ver, 'exp', ARGV[5])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
if ARGV[5] ~= '0' then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[8])
else
  redis.call('ZREM', KEYS[4], ARGV[8])
end
for _, f in ipairs({'t', 'put', 'k', ARGV[3], 'v', ARGV[4], 'c', c, 'n', ver, 'e', ARGV[5]}) do
  xadd[#xadd + 1] = f
end
redis.call(unpack(xadd))
return {1, rev, c, ver}
"""

# KEYS: 1 rev, 2 the ttl set; ARGV: 1 now, 2 history, 3 prefix, 4 batch
# One revision for every key it deletes (as etcd revokes a lease's keys at once).
SWEEP = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local rev = 0
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[2], m)
  local i = string.find(m, ':', 1, true)
  local ns, key = string.sub(m, 1, i - 1), string.sub(m, i + 1)
  local kv = ARGV[3] .. 'kv:' .. ns .. ':' .. key
  local e = tonumber(redis.call('HGET', kv, 'exp') or '0')
  if e > 0 and e <= tonumber(ARGV[1]) then
    if rev == 0 then rev = redis.call('INCR', KEYS[1]) end
    redis.call('DEL', kv)
    redis.call('ZREM', ARGV[3] .. 'idx:' .. ns, key)
    local xadd = {'XADD', ARGV[3] .. 'ev:' .. ns}
    local floor = rev - tonumber(ARGV[2])
    if floor > 0 then
      xadd[#xadd + 1] = 'MINID'
      xadd[#xadd + 1] = string.format('%d', floor)
    end
    for _, f in ipairs({string.format('%d-*', rev), 't', 'delete', 'k', key, 'v', '',
                        'c', '0', 'n', '0', 'e', '0'}) do
      xadd[#xadd + 1] = f
    end
    redis.call(unpack(xadd))
  end
end
return rev
"""

# KEYS: 1 rev, 2 the namespace's index; ARGV: 1 prefix, 2 namespace, 3 lex min, 4 lex max,
# 5 limit (0: all), 6 now. Reply: {rev, {key, v, c, m, ver, exp}, ...}, in key order.
LIST = """
local out = {redis.call('GET', KEYS[1]) or '0'}
local limit = tonumber(ARGV[5])
local offset = 0
while true do
  local keys = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[3], ARGV[4], 'LIMIT', offset, 256)
  for _, key in ipairs(keys) do
    local h = redis.call('HMGET', ARGV[1] .. 'kv:' .. ARGV[2] .. ':' .. key,
                         'v', 'c', 'm', 'ver', 'exp')
    if h[1] then
      local e = tonumber(h[5])
      if e == 0 or e > tonumber(ARGV[6]) then
        out[#out + 1] = {key, h[1], h[2], h[3], h[4], h[5]}
        if limit > 0 and #out > limit then return out end
      end
    end
  end
  if #keys < 256 then return out end
  offset = offset + 256
end
"""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _kv(key: bytes, v: bytes, c: Any, m: Any, ver: Any, exp: Any) -> KeyValue:
    return KeyValue(_text(key), bytes(v), int(c), int(m), int(ver), float(exp))


class RedisStorage:
    """:class:`hsu.ports.Storage` on one Redis server (docs/storage.md)."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        max_value_bytes: int = StorageSettings().max_value_bytes,
    ) -> None:
        self.settings = settings
        self._max_value = max_value_bytes
        self._where = settings.describe()
        self._p = settings.prefix.encode()
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._sweep_error = ""

    @property
    def max_value_bytes(self) -> int:
        return self._max_value

    @property
    def describe(self) -> str:
        return self._where

    # -- the connection -------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._closed:
            raise StorageError(f"{self._where}: the storage is closed")
        if self._client is None:
            self._client = aioredis.Redis(**self.settings.client_kwargs())
            for name, body in (("write", WRITE), ("sweep", SWEEP), ("list", LIST)):
                self._scripts[name] = self._client.register_script(body)
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self._client

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, write: bool) -> T:
        """``fn()``, its redis-py errors as hsu's: what failed, and where."""
        try:
            return await fn()
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            raise self._unavailable(what, exc, write) from None
        except rexc.ResponseError as exc:
            # refused before the script ran (OOM, MISCONF, READONLY, NOAUTH): no change
            tail = "; nothing was written" if write else ""
            raise StorageError(f"{self._where}: {what}: the server refused: {exc}{tail}") from None
        except rexc.RedisError as exc:
            raise StorageError(f"{self._where}: {what}: {type(exc).__name__}: {exc}") from None

    def _unavailable(self, what: str, exc: Exception, write: bool) -> StorageUnavailable:
        reason = str(exc).rstrip(".") or type(exc).__name__
        if isinstance(exc, rexc.AuthenticationError):
            return StorageUnavailable(f"redis at {self._where}: {what}: {reason}")
        unsent = "connecting to" in reason or "Timeout connecting" in reason
        if not write:
            tail = ""
        elif unsent:
            tail = "; nothing was written"
        else:
            tail = (
                "; the connection broke after the request was sent, so the change may or may"
                " not have been made: read the key to see"
            )
        return StorageUnavailable(f"redis at {self._where} is unavailable: {what}: {reason}{tail}")

    # -- keys --------------------------------------------------------------------

    def _k(self, kind: str, ns: str, raw: bytes = b"") -> bytes:
        return (
            self._p
            + kind.encode()
            + b":"
            + ns.encode()
            + (b":" + raw if raw or kind == "kv" else b"")
        )

    # -- reads ------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> KeyValue | None:
        ns, raw = check_namespace(namespace), check_key(key)
        r = self._redis()
        row = await self._call(
            f"get {ns}/{key!r:.80}",
            lambda: r.hmget(self._k("kv", ns, raw), [b"v", b"c", b"m", b"ver", b"exp"]),
            write=False,
        )
        if row[0] is None:
            return None
        kv = _kv(raw, *row)  # type: ignore[arg-type]
        if kv.expires_at and kv.expires_at <= time.time():
            return None
        return kv

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        ns = check_namespace(namespace)
        start, end = key_range(check_key(prefix, field="prefix", empty=True))
        if not isinstance(limit, int) or limit < 0:
            raise InvalidValue(f"limit: must be an integer >= 0, got {limit!r}")
        lo = b"[" + start if start else b"-"
        hi = b"(" + end if end is not None else b"+"
        self._redis()
        out = await self._call(
            f"list {ns}/{prefix!r:.80}",
            lambda: self._scripts["list"](
                keys=[self._p + b"rev", self._k("idx", ns)],
                args=[self._p, ns, lo, hi, limit, repr(time.time())],
            ),
            write=False,
        )
        return [_kv(*row) for row in out[1:]], int(out[0])

    # -- writes -----------------------------------------------------------------

    async def _write(
        self, what: str, ns: str, raw: bytes, op: str, expect: int | None, value: bytes,
        ttl: float | None,
    ) -> tuple[_Reply, float]:  # fmt: skip
        """The write script's reply, and the key's expiry it set (0: none)."""
        now = time.time()
        expires = now + ttl if ttl else 0.0
        self._redis()
        reply: _Reply = await self._call(
            what,
            lambda: self._scripts["write"](
                keys=[
                    self._p + b"rev",
                    self._k("kv", ns, raw),
                    self._k("idx", ns),
                    self._p + b"ttl",
                    self._k("ev", ns),
                ],
                args=[
                    op,
                    "-" if expect is None else str(expect),
                    raw,
                    value,
                    repr(expires) if expires else "0",
                    repr(now),
                    self.settings.history,
                    ns.encode() + b":" + raw,
                ],
            ),
            write=True,
        )
        return reply, expires

    async def put(
        self, namespace: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> KeyValue:
        ns, raw = check_namespace(namespace), check_key(key)
        data, ttl = check_value(value, self._max_value), check_ttl(ttl)
        reply = await self._write(f"put {ns}/{key!r:.80}", ns, raw, "put", None, data, ttl)
        return self._stored(raw, data, *reply)

    @staticmethod
    def _stored(raw: bytes, data: bytes, reply: _Reply, expires: float) -> KeyValue:
        _, rev, create, version = reply
        return KeyValue(_text(raw), data, int(create), int(rev), int(version), expires)

    async def delete(self, namespace: str, key: str) -> int:
        ns, raw = check_namespace(namespace), check_key(key)
        reply, _ = await self._write(f"delete {ns}/{key!r:.80}", ns, raw, "del", None, b"", None)
        return int(reply[1])

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
            raise InvalidValue(f"revision: must be an integer >= 0, got {revision!r}")
        reply, expires = await self._write(
            f"compare-and-set {ns}/{key!r:.80}", ns, raw, "del" if data is None else "put",
            revision, data or b"", ttl,
        )  # fmt: skip
        if int(reply[0]) == 0:
            return False, (_kv(raw, *reply[2:]) if len(reply) > 2 else None)
        if data is None:
            return True, None
        return True, self._stored(raw, data, reply, expires)

    # -- TTLs -------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Delete the keys whose TTL ran out (watchers see a delete)."""
        while not self._closed:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await self._call(
                    "expire keys",
                    lambda: self._scripts["sweep"](
                        keys=[self._p + b"rev", self._p + b"ttl"],
                        args=[repr(time.time()), self.settings.history, self._p, SWEEP_BATCH],
                    ),
                    write=True,
                )
                self._sweep_error = ""
            except StorageError as exc:
                if str(exc) != self._sweep_error:  # once per kind of failure, not per second
                    self._sweep_error = str(exc)
                    logger.warning("redis storage: {}", exc)

    # -- watch ------------------------------------------------------------------

    async def watch(
        self, namespace: str, prefix: str = "", *, after: int = 0
    ) -> AsyncIterator[StorageEvent]:
        """Reads the namespace's stream from ``after``: each poll is one
        ``MULTI`` of ``GET rev`` and ``XREAD``, so the check that nothing the
        watcher still needs was trimmed and the read see the same state; a
        blocking ``XREAD`` only waits for the next entry."""
        ns = check_namespace(namespace)
        check_key(prefix, field="prefix", empty=True)
        if not isinstance(after, int) or after < 0:
            raise InvalidValue(f"revision: must be an integer >= 0, got {after!r}")
        r = self._redis()
        stream = self._k("ev", ns)
        where = f"watch {ns}/{prefix!r:.80}"
        if after == 0:
            after = int(await self._call(where, lambda: r.get(self._p + b"rev"), write=False) or 0)
        # the stream's ids are {revision}-{n}: start after every entry of ``after``
        cursor = f"{after}-{MAX_SEQ}".encode()
        history = self.settings.history

        async def poll() -> _Reply:
            async with r.pipeline(transaction=True) as pipe:
                pipe.get(self._p + b"rev")
                pipe.xread({stream: cursor}, count=WATCH_BATCH)
                out: _Reply = await pipe.execute()
                return out

        while True:
            rev, got = await self._call(where, poll, write=False)
            oldest = int(rev or 0) - history
            seen = int(cursor.split(b"-", 1)[0])
            if seen < oldest:
                raise StorageCompacted(
                    f"{self._where}: revision {seen} of {ns} is compacted (the oldest kept is"
                    f" {oldest}); list again and watch from its revision",
                    oldest,
                )
            entries = _entries(got)
            for entry_id, fields in entries:
                cursor = entry_id
                key = _text(fields[b"k"])
                if not key.startswith(prefix):
                    continue
                event_rev = int(entry_id.split(b"-", 1)[0])
                kind = fields[b"t"].decode()
                kv = KeyValue(
                    key, fields[b"v"], int(fields[b"c"]), event_rev, int(fields[b"n"]),
                    float(fields[b"e"]),
                )  # fmt: skip
                yield StorageEvent(kind, kv, event_rev)
            if entries:
                continue
            # nothing new: wait (blocking) for the next entry, then poll again
            await self._call(
                where,
                functools.partial(r.xread, {stream: cursor}, count=1, block=WATCH_BLOCK_MS),
                write=False,
            )

    # -- the end ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._client is not None:
            with contextlib.suppress(rexc.RedisError, OSError):
                await self._client.aclose()
            self._client = None


def _entries(got: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's reply (RESP2 list or RESP3 map) as ``[(id, fields)]``."""
    if not got:
        return []
    if isinstance(got, dict):
        return [(i, f) for batches in got.values() for batch in batches for i, f in batch]
    return [(i, f) for _name, batch in got for i, f in batch]
