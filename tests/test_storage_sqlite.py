"""The sqlite storage beyond the contract: durable before a put returns, its
file owner-only, a corrupt file and a full disk named, compaction."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hsu.errors import StorageError
from hsu.ports import StorageCompacted
from hsu_plugins.storage.sqlite import SqliteStorage

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

BURST = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from hsu_plugins.storage.sqlite import SqliteStorage

    async def main():
        s = SqliteStorage(Path(sys.argv[1]))
        i = 0
        while True:
            await s.put("burst", f"k{i:06d}", str(i).encode())
            print(i, flush=True)  # acknowledged: the put returned
            i += 1

    asyncio.run(main())
    """
)


async def test_every_acknowledged_put_survives_a_sigkill(tmp_path):
    path = tmp_path / "s.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BURST, str(path), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    acked = -1
    try:
        async with asyncio.timeout(60):
            while acked < 200:
                line = await proc.stdout.readline()
                assert line, "the writer stopped"
                acked = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        # what it printed before it died was acknowledged too
        rest = await proc.stdout.read()
        await proc.wait()
    for line in rest.split():
        acked = int(line)
    s = SqliteStorage(path)
    try:
        items, _ = await s.list("burst")
    finally:
        await s.close()
    keys = {kv.key for kv in items}
    assert all(f"k{i:06d}" in keys for i in range(acked + 1)), (acked, len(keys))


async def test_the_file_is_0600_and_another_users_file_is_not_opened(tmp_path):
    old = os.umask(0)
    try:
        s = SqliteStorage(tmp_path / "state" / "s.sqlite3")
        await s.put("ns", "k", b"v")
        await s.close()
    finally:
        os.umask(old)
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for p in state.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # a file another user made, where this user reads its storage (a dir
    # another user can reach: pytest's tmp_path is this user's alone)
    shared = Path(tempfile.mkdtemp(prefix="hsu-shared-"))
    try:
        os.chmod(shared, 0o777)
        planted = shared / "planted.sqlite3"
        subprocess.run([*NOBODY, "touch", str(planted)], check=True)  # noqa: ASYNC221
        s = SqliteStorage(planted)
        with pytest.raises(
            StorageError, match=f"^{planted}: the storage file is owned by uid 65534"
        ):
            await s.get("ns", "k")
        await s.close()
        assert planted.stat().st_size == 0  # not written to
    finally:
        shutil.rmtree(shared)


async def test_a_corrupt_file_is_named_and_left_alone(tmp_path):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"this is not a database, it is a poem " * 200)
    path.chmod(0o600)
    before = path.read_bytes()
    s = SqliteStorage(path)
    with pytest.raises(StorageError, match=f"^{path}: not a storage file this version reads"):
        await s.get("ns", "k")
    with pytest.raises(StorageError, match=str(path)):  # every call, not only the first
        await s.put("ns", "k", b"v")
    await s.close()
    assert path.read_bytes() == before


async def test_a_full_disk_is_a_clear_error_and_the_previous_state_stays(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = SqliteStorage(path, max_value_bytes=1 << 20, max_bytes=256 * 1024)
    try:
        await s.put("ns", "kept", b"before")
        with pytest.raises(StorageError, match=f"^{path}: the disk is full .*nothing was written"):
            for i in range(64):
                await s.put("ns", f"big{i}", os.urandom(64 * 1024))
        got = await s.get("ns", "kept")
        assert got is not None and got.value == b"before"
        # still usable for what fits
        await s.delete("ns", "big0")
        await s.put("ns", "kept", b"after")
    finally:
        await s.close()
    s = SqliteStorage(path)
    try:
        got = await s.get("ns", "kept")
        assert got is not None and got.value == b"after"
    finally:
        await s.close()


async def test_a_watch_from_a_compacted_revision_is_told_so(tmp_path):
    s = SqliteStorage(tmp_path / "s.sqlite3", history=10)
    try:
        first = await s.put("ns", "k", b"0")
        for i in range(130):
            await s.put("ns", "k", str(i).encode())
        with pytest.raises(StorageCompacted) as info:
            async for _ in s.watch("ns", after=first.mod_revision):
                break
        assert info.value.compact_revision > first.mod_revision
    finally:
        await s.close()


async def test_without_a_ttl_the_sweeper_does_not_wake_and_a_new_ttl_still_runs_out(
    tmp_path, monkeypatch
):
    store = SqliteStorage(tmp_path / "s.db")
    sweeps: list[float | None] = []
    expire = store._expire

    def counted(conn):
        sweeps.append(expire(conn))
        return sweeps[-1]

    monkeypatch.setattr(store, "_expire", counted)
    try:
        await store.put("ns", "k", b"v")  # starts the sweeper: one look, no TTL anywhere
        await asyncio.sleep(2.5)  # the sweep was every 1 s: 2 more by now
        assert sweeps == [None]
        await store.put("ns", "short", b"v", ttl=0.3)
        for _ in range(100):  # bounded: 5 s
            if await store.get("ns", "short") is None and sweeps[-1] is None and len(sweeps) > 1:
                break
            await asyncio.sleep(0.05)
        assert await store.get("ns", "short") is None
        assert sweeps[-1] is None  # the sweep deleted it: nothing left to wait for
        assert [kv.key for kv in (await store.list("ns"))[0]] == ["k"]
    finally:
        await store.close()
