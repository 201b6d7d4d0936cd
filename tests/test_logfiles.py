"""The kernel following the stdout/stderr files of its HSUs: real files, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

import hsu._kernel.supervision.logfiles
from hsu._kernel.supervision.logfiles import IN_Q_OVERFLOW, LINE_BUDGET, LogFiles

CHILD = r"""
import os, sys, time
out, err = sys.stdout.buffer, sys.stderr.buffer
out.write(b"one\n"); out.flush()
out.write(b"part"); out.flush()
err.write(b"e1\r\n"); err.flush()
deadline = time.monotonic() + 10
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)
out.write(b"ial\nbad \xff byte\n{braces} <b>\n"); out.flush()
err.write(b"no newline at end"); err.flush()
"""

FLOOD = r"""
import os, time
# Writes flat out until it has seen its file rotated (truncated under it) 3 times.
i, rotations, size, deadline = 0, 0, 0, time.monotonic() + 20
while rotations < 3 and time.monotonic() < deadline:
    os.write(1, b"%d\n" % i)  # one write per line: a line is lost whole or not at all
    i += 1
    now = os.fstat(1).st_size
    rotations += now < size
    size = now
"""


async def until(cond: Callable[[], object], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []
    sink = logger.add(lambda m: got.append(m.record), level="TRACE", format="{message}")
    yield got
    logger.remove(sink)


def messages(records: list[dict[str, Any]], instance: str, stream: str = "stdout") -> list[str]:
    return [
        r["message"]
        for r in records
        if r["extra"].get("instance") == instance and r["extra"].get("stream") == stream
    ]


def spawn(lf: LogFiles, unit: str, instance: str, *argv: str) -> subprocess.Popen[bytes]:
    out, err = lf.open_for_child(unit, instance)
    try:
        return subprocess.Popen(
            [sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    finally:
        os.close(out)
        os.close(err)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


async def test_a_child_s_lines_reach_the_tail_and_the_log_per_stream(tmp_path, records):
    lf = LogFiles(tmp_path / "logs", interval=0.01)
    go = tmp_path / "go"
    task = asyncio.create_task(lf.run())
    proc = spawn(lf, "u", "u-1", "-c", CHILD, str(go))
    try:
        lf.follow("u", "u-1", proc.pid, from_start=True)
        await until(lambda: ("stderr", "e1") in lf.tail("u-1"))
        lf.poll()  # "part" was written before "e1", so it is there to be read now
        # (at once, or 2 ms later if the rotation thread held the file: BUSY_RETRY)
        await until(lambda: lf.tail("u-1", stream="stdout") == [("stdout", "one")])
        go.touch()
        await until(lambda: proc.poll() is not None)
        await until(lambda: len(lf.tail("u-1", stream="stdout")) == 4)
        assert lf.tail("u-1", stream="stderr") == [("stderr", "e1")]  # no newline yet
        lf.unfollow("u-1")
    finally:
        stop(proc)
        task.cancel()
    stdout = ["one", "partial", "bad \ufffd byte", "{braces} <b>"]
    stderr = ["e1", "no newline at end"]
    assert lf.tail("u-1", stream="stdout") == [("stdout", line) for line in stdout]
    assert lf.tail("u-1", stream="stderr") == [("stderr", line) for line in stderr]
    assert sorted(lf.tail("u-1")) == sorted(
        [("stdout", line) for line in stdout] + [("stderr", line) for line in stderr]
    )
    assert lf.tail("u-1", n=1) == [("stderr", "no newline at end")]
    assert (tmp_path / "logs" / "u" / "u-1.stdout.log").stat().st_mode & 0o777 == 0o600
    assert messages(records, "u-1") == stdout
    assert messages(records, "u-1", "stderr") == stderr
    extras = {
        (r["extra"]["unit"], r["extra"]["pid"], r["extra"]["stream"], r["level"].name)
        for r in records
        if r["extra"].get("instance") == "u-1"
    }
    assert extras == {("u", proc.pid, "stdout", "INFO"), ("u", proc.pid, "stderr", "INFO")}


# 60 s: the lines can only come from inotify events, the copytruncate's included
@pytest.mark.parametrize("interval", [0.01, 60.0], ids=["short-interval", "events-only"])
async def test_rotation_keeps_backups_and_logs_every_line_once_in_order(
    tmp_path, records, interval
):
    lf = LogFiles(tmp_path, max_bytes=4096, backups=2, interval=interval, gap=0.02)
    out, err = lf.open_for_child("u", "u-r")
    lf.follow("u", "u-r", os.getpid(), from_start=True)
    task = asyncio.create_task(lf.run())
    written: list[str] = []
    try:
        # The writer is this test, on the loop's own thread: each write lands
        # between two ticks, never between a rotation's copy and its truncate,
        # so copytruncate's lossy window cannot bite here (it can for a child).
        for batch in range(14):
            lines = [f"line {batch:02d}-{i:02d} " + "x" * 60 for i in range(20)]
            os.write(out, "".join(line + "\n" for line in lines).encode())
            written += lines
            count = len(written)
            await until(lambda n=count: len(messages(records, "u-r")) == n)
    finally:
        task.cancel()
        os.close(out)
        os.close(err)
        lf.close()
    stdout = tmp_path / "u" / "u-r.stdout.log"
    backups = [stdout.with_name(f"{stdout.name}.{i}") for i in (2, 1)]
    assert all(b.exists() for b in backups)
    assert sorted(p.name for p in stdout.parent.iterdir()) == sorted(
        ["u-r.stdout.log", "u-r.stdout.log.1", "u-r.stdout.log.2", "u-r.stderr.log"]
    )
    kept = [line for p in [*backups, stdout] for line in p.read_text().splitlines()]
    assert len(kept) == len(set(kept))
    assert 0 < len(kept) < len(written)
    assert kept == written[-len(kept) :]
    assert messages(records, "u-r") == written
    assert lf.tail("u-r") == [("stdout", line) for line in written[-200:]]


async def test_rotation_under_a_child_writing_flat_out_never_duplicates(tmp_path, records):
    lf = LogFiles(tmp_path, max_bytes=4096, backups=2, interval=0.001, gap=0.001)
    task = asyncio.create_task(lf.run())
    proc = spawn(lf, "u", "u-f", "-c", FLOOD)
    try:
        lf.follow("u", "u-f", proc.pid, from_start=True)
        await until(lambda: proc.poll() is not None, within=30)
        lf.unfollow("u-f")
    finally:
        stop(proc)
        task.cancel()
    numbers = [int(line) for line in messages(records, "u-f")]
    # lines written during a copy-to-truncate window may be lost, never repeated
    assert numbers
    wrong = [(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(numbers)) if a >= b]
    assert not wrong, f"out of order or repeated at (index, a, b): {wrong[:10]}"
    names = sorted(p.name for p in (tmp_path / "u").iterdir())
    assert names == ["u-f.stderr.log", "u-f.stdout.log", "u-f.stdout.log.1", "u-f.stdout.log.2"]


async def test_a_file_far_over_its_size_is_rotated_off_the_loop_keeping_its_last_bytes(
    tmp_path, records, monkeypatch
):
    max_bytes = 64 * 1024
    lf = LogFiles(tmp_path, max_bytes=max_bytes, backups=1, interval=0.05)
    rotated_on: list[str] = []
    real = lf._rotate

    def spy(f: Any) -> None:
        rotated_on.append(threading.current_thread().name)
        real(f)

    monkeypatch.setattr(lf, "_rotate", spy)
    out, err = lf.open_for_child("u", "u-big")
    lf.follow("u", "u-big", 1, from_start=True)
    stdout = tmp_path / "u" / "u-big.stdout.log"
    lines = [f"{i:05d} " + "z" * 93 for i in range(10_000)]  # 1 MB in one write
    task = asyncio.create_task(lf.run())
    try:
        await asyncio.sleep(0)
        os.write(out, "".join(line + "\n" for line in lines).encode())
        await until(lambda: messages(records, "u-big")[-1:] == [lines[-1]], within=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        os.close(out)
        os.close(err)
        lf.close()
    assert stdout.stat().st_size == 0
    kept = stdout.with_name(f"{stdout.name}.1").read_bytes()
    # only its last max_bytes, from a line's start: not the 1 MB
    assert max_bytes - 100 <= len(kept) <= max_bytes
    assert kept.decode().splitlines() == lines[-len(kept) // 100 :]
    assert set(rotated_on) == {"hsu-log-rotation"}  # never the event loop
    # what the reader had not read when it was rotated: the last lines, once,
    # in order, after a warning of what it skipped
    logged = messages(records, "u-big")
    head = next(i for i, line in enumerate(logged) if line != lines[i])
    assert head < len(lines) - len(kept) // 100
    assert logged[head:] == lines[-(len(logged) - head) :]
    (warning,) = [r["message"] for r in records if r["level"].name == "WARNING"]
    assert "bytes skipped" in warning and "u-big.stdout.log.1" in warning


def test_a_backup_is_never_bigger_than_max_bytes_and_a_little(tmp_path, records):
    lf = LogFiles(tmp_path, max_bytes=4096, backups=2)
    assert lf.slack == 1024  # a quarter of max_bytes, when less than ROTATE_SLACK
    out, err = lf.open_for_child("u", "u-s")
    lf.follow("u", "u-s", 1, from_start=True)
    stdout = tmp_path / "u" / "u-s.stdout.log"
    sizes = []
    for n in (4000, 200, 40_000, 5000, 4096 + 1024 + 10):  # bytes in one write
        os.write(out, (b"w" * 99 + b"\n") * (n // 100) + b"w" * (n % 100))
        lf.poll()  # no event loop: the reader rotates itself
        sizes.append([p.stat().st_size for p in sorted(stdout.parent.glob("u-s.stdout.log.*"))])
    os.close(out)
    os.close(err)
    lf.close()
    assert all(size <= 4096 + 1024 for row in sizes for size in row), sizes
    assert sizes[0] == []  # 4000: not over
    assert sizes[1] == [4200]  # over by one write: copied whole
    assert sizes[2][0] <= 4096  # 40 kB at once: its last 4 KiB only
    assert stdout.stat().st_size <= 4096


def test_without_backups_a_file_is_truncated_and_no_copy_kept(tmp_path, records):
    lf = LogFiles(tmp_path, max_bytes=1024, backups=0)
    out, err = lf.open_for_child("u", "u-0")
    lf.follow("u", "u-0", 1, from_start=True)
    lines = [f"{i:03d} " + "y" * 40 for i in range(50)]
    os.write(out, "".join(line + "\n" for line in lines).encode())
    lf.poll()
    os.write(out, b"after\n")
    lf.poll()
    os.close(out)
    os.close(err)
    lf.close()
    assert messages(records, "u-0") == [*lines, "after"]
    assert (tmp_path / "u" / "u-0.stdout.log").read_bytes() == b"after\n"
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == [
        "u-0.stderr.log",
        "u-0.stdout.log",
    ]


def test_follow_from_the_end_skips_existing_content_from_start_reads_it(tmp_path):
    out, err = LogFiles(tmp_path).open_for_child("u", "u-a")
    os.write(out, b"old\n")
    os.write(err, b"old err\n")
    reattached, fresh = LogFiles(tmp_path), LogFiles(tmp_path)
    reattached.follow("u", "u-a", 1)
    fresh.follow("u", "u-a", 1, from_start=True)
    os.write(out, b"new\n")
    reattached.poll()
    fresh.poll()
    os.close(out)
    os.close(err)
    reattached.close()
    fresh.close()
    assert reattached.tail("u-a") == [("stdout", "new")]
    assert fresh.tail("u-a") == [("stdout", "old"), ("stdout", "new"), ("stderr", "old err")]


def test_unfollow_flushes_a_last_partial_line_then_stops_reading(tmp_path):
    lf = LogFiles(tmp_path)
    out, err = lf.open_for_child("u", "u-p")
    lf.follow("u", "u-p", 1, from_start=True)
    os.write(out, b"done\nno newline")
    lf.poll()
    assert lf.tail("u-p") == [("stdout", "done")]
    lf.unfollow("u-p")
    assert lf.tail("u-p") == [("stdout", "done"), ("stdout", "no newline")]
    os.write(out, b"more\n")
    lf.poll()
    os.close(out)
    os.close(err)
    assert lf.tail("u-p") == [("stdout", "done"), ("stdout", "no newline")]
    lf.forget("u-p")
    assert lf.tail("u-p") == []


def test_a_very_long_line_comes_out_in_64_kib_pieces(tmp_path):
    lf = LogFiles(tmp_path)
    out, err = lf.open_for_child("u", "u-l")
    lf.follow("u", "u-l", 1, from_start=True)
    os.write(out, b"x" * 150_000)
    lf.poll()
    assert [len(line) for _, line in lf.tail("u-l")] == [65536, 65536]
    # a piece never ends inside a UTF-8 character
    os.write(out, b"y\n" + b"a" * 65535 + "é".encode() + b"\n")
    lf.poll()
    os.close(out)
    os.close(err)
    lf.close()
    assert [line for _, line in lf.tail("u-l")][2:] == ["x" * 18928 + "y", "a" * 65535, "é"]


def test_a_vanished_file_is_dropped_with_one_warning_and_the_loop_goes_on(tmp_path, records):
    lf = LogFiles(tmp_path)
    lf.follow("u", "missing", 1)  # never created
    out, err = lf.open_for_child("u", "u-v")
    lf.follow("u", "u-v", 1, from_start=True)
    stdout, _ = lf.paths("u", "u-v")
    os.write(out, b"last words\n")
    lf.poll()
    stdout.unlink()
    os.write(out, b"into the deleted file\n")  # not read: no fd is held between reads
    for _ in range(3):
        lf.poll()
    os.write(out, b"not read\n")
    os.write(err, b"still followed\n")
    lf.poll()
    os.close(out)
    os.close(err)
    lf.close()
    warnings = [r["message"] for r in records if r["level"].name == "WARNING"]
    assert len(warnings) == 3, warnings  # both streams of "missing", stdout of "u-v" once
    assert "u-v" in warnings[-1] and "deleted" in warnings[-1]
    assert lf.tail("u-v") == [("stdout", "last words"), ("stderr", "still followed")]


def test_a_drain_far_behind_skips_to_the_last_bytes_and_says_so(tmp_path, records):
    lf = LogFiles(tmp_path)
    out, err = lf.open_for_child("u", "u-b")
    lf.follow("u", "u-b", 1, from_start=True)
    lines = [f"{i:04d} " + "b" * 995 for i in range(1500)]  # 1.5 MB, never polled
    os.write(out, "".join(line + "\n" for line in lines).encode())
    lf.unfollow("u-b")
    os.close(out)
    os.close(err)
    logged = messages(records, "u-b")
    assert logged[-1] == lines[-1]
    assert 1000 < len(logged) < len(lines)
    assert logged == lines[-len(logged) :]  # from a line's start
    (warning,) = [r["message"] for r in records if r["level"].name == "WARNING"]
    assert "skipped" in warning and "u-b" in warning


def test_a_tick_logs_a_bounded_number_of_lines_and_the_next_ones_go_on(tmp_path, records):
    lf = LogFiles(tmp_path)
    out, err = lf.open_for_child("u", "u-t")
    lf.follow("u", "u-t", 1, from_start=True)
    lines = [f"t{i}" for i in range(LINE_BUDGET * 2 + 500)]
    os.write(out, "".join(line + "\n" for line in lines).encode() + b"half")
    counts = []
    for _ in range(4):
        lf.poll()
        counts.append(len(messages(records, "u-t")))
    os.write(out, b" done\n")
    lf.poll()
    os.close(out)
    os.close(err)
    lf.close()
    assert counts == [LINE_BUDGET, 2 * LINE_BUDGET, len(lines), len(lines)]
    assert messages(records, "u-t") == [*lines, "half done"]


# -- following by inotify events, and the fallback


def ours(lf: LogFiles) -> list[asyncio.TimerHandle]:
    """The timers the loop holds for ``lf``."""
    loop: Any = asyncio.get_running_loop()
    return [
        h
        for h in loop._scheduled
        if not h.cancelled() and getattr(h._callback, "__self__", None) is lf
    ]


def count_passes(lf: LogFiles, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every file ``lf`` reads, once per read, whatever woke it."""
    passed: list[Any] = []
    real = lf._pass

    def spy(f: Any, now: float, *, fresh: bool = False) -> None:
        passed.append(f)
        real(f, now, fresh=fresh)

    monkeypatch.setattr(lf, "_pass", spy)
    return passed


def inotify_watches(fd: int) -> list[str]:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        return [line for line in info if line.startswith("inotify wd:")]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_line_the_rotation_thread_held_up_is_read_soon_not_at_the_tick_end(tmp_path):
    # The rotation thread wakes on the same write as the reader and holds the
    # file's lock for its fstat (or a rotation): the reader, turned away, comes
    # back in milliseconds, not when its budget's tick ends (a minute here).
    lf = LogFiles(tmp_path, interval=60)
    out, err = lf.open_for_child("u", "u-b")
    task = asyncio.create_task(lf.run())
    try:
        await asyncio.sleep(0)
        lf.follow("u", "u-b", 1)
        held = next(f for f in lf._files if f.instance_id == "u-b" and f.stream == "stdout")
        held.lock.acquire()  # as _enforce() does on the rotation thread
        try:
            os.write(out, b"held up\n")
            await asyncio.sleep(0.2)  # the reader woke and was turned away
            assert lf.tail("u-b") == []
        finally:
            held.lock.release()
        await until(lambda: lf.tail("u-b") == [("stdout", "held up")], within=5)
    finally:
        task.cancel()
        os.close(out)
        os.close(err)
        lf.close()


async def test_an_event_not_a_timer_brings_a_line_to_the_tail(tmp_path):
    lf = LogFiles(tmp_path, interval=60)  # the first timer would fire in a minute
    out, err = lf.open_for_child("u", "u-e")
    os.write(out, b"before follow\n")
    old_out, old_err = lf.open_for_child("u", "u-old")
    os.write(old_out, b"before a kernel restart\n")
    task = asyncio.create_task(lf.run())
    try:
        await asyncio.sleep(0)  # run() is up: what follows is seen by events only
        lf.follow("u", "u-e", 1, from_start=True)
        lf.follow("u", "u-old", 1)  # re-attached: from the end
        await until(lambda: lf.tail("u-e") == [("stdout", "before follow")])
        for i in range(3):
            os.write(out if i % 2 else err, b"line %d\n" % i)
            await until(lambda n=i: len(lf.tail("u-e")) == n + 2, within=5)
        os.write(old_out, b"after\n")
        await until(lambda: lf.tail("u-old") == [("stdout", "after")], within=5)
        assert not lf._polled
        await until(lambda: not ours(lf), within=2)  # the gap after the last wake-up
    finally:
        task.cancel()
        for fd in (out, err, old_out, old_err):
            os.close(fd)
        lf.close()
    assert lf.tail("u-e") == [
        ("stdout", "before follow"),
        ("stderr", "line 0"),
        ("stdout", "line 1"),
        ("stderr", "line 2"),
    ]


async def test_an_idle_follower_has_no_timer_and_reads_nothing(tmp_path, monkeypatch):
    lf = LogFiles(tmp_path, interval=0.01)  # a poll loop would tick ~50 times below
    fds = []
    for i in range(20):
        fds += lf.open_for_child("u", f"u-{i}")
        lf.follow("u", f"u-{i}", 1, from_start=True)
    os.write(fds[0], b"busy once\n")
    passed = count_passes(lf, monkeypatch)
    task = asyncio.create_task(lf.run())
    try:
        await until(lambda: lf.tail("u-0") == [("stdout", "busy once")])
        assert ours(lf) == []  # one line, one wake-up: nothing scheduled after it
        passed.clear()
        await asyncio.sleep(0.5)
        assert passed == []
        assert ours(lf) == []
        assert len(lf._watches) == 40 and not lf._polled
        os.write(fds[3], b"wake\n")  # one file written: that file read, no other
        await until(lambda: lf.tail("u-1") == [("stderr", "wake")])
        assert ours(lf) == []
        assert {(f.instance_id, f.stream) for f in passed} == {("u-1", "stderr")}
    finally:
        task.cancel()
        for fd in fds:
            os.close(fd)
        lf.close()


class NoInotify:
    def __init__(self) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")


@pytest.mark.parametrize("how", ["unavailable", "turned-off"])
async def test_without_inotify_the_files_are_polled(tmp_path, monkeypatch, records, how):
    if how == "unavailable":
        monkeypatch.setattr(hsu._kernel.supervision.logfiles, "_Inotify", NoInotify)
    lf = LogFiles(tmp_path, interval=0.02, inotify=how != "turned-off")
    passed = count_passes(lf, monkeypatch)
    out, err = lf.open_for_child("u", "u-p")
    out2, err2 = lf.open_for_child("u", "u-q")
    lf.follow("u", "u-p", 1, from_start=True)
    task = asyncio.create_task(lf.run())
    try:
        lf.follow("u", "u-q", 1, from_start=True)
        os.write(out, b"polled\n")
        os.write(err2, b"polled too\n")
        await until(lambda: lf.tail("u-p") == [("stdout", "polled")])
        await until(lambda: lf.tail("u-q") == [("stderr", "polled too")])
        assert lf._inotify is None and not lf._watches and len(lf._polled) == 4
        passed.clear()
        await until(lambda: len(passed) >= 8)  # polled: ticks go on, idle or not
    finally:
        task.cancel()
        for fd in (out, err, out2, err2):
            os.close(fd)
        lf.close()
    debug = [r["message"] for r in records if r["level"].name == "DEBUG"]
    if how == "unavailable":
        (said,) = debug  # once, not once a file
        assert "inotify unavailable" in said and "Function not implemented" in said
    else:
        assert debug == []


async def test_a_file_that_cannot_be_watched_is_polled_the_others_are_not(
    tmp_path, monkeypatch, records
):
    real = hsu._kernel.supervision.logfiles._Inotify.add_watch

    def add_watch(self: Any, fd: int, path: Any) -> int:
        if str(path).endswith(".stderr.log"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, path)

    monkeypatch.setattr(hsu._kernel.supervision.logfiles._Inotify, "add_watch", add_watch)
    lf = LogFiles(tmp_path, interval=0.05)
    out, err = lf.open_for_child("u", "u-m")
    lf.follow("u", "u-m", 1, from_start=True)
    task = asyncio.create_task(lf.run())
    try:
        assert [f.stream for f in lf._polled] == ["stderr"]
        assert [f.stream for files in lf._watches.values() for f in files] == ["stdout"]
        os.write(out, b"by event\n")
        os.write(err, b"by poll\n")
        await until(lambda: len(lf.tail("u-m")) == 2)
        assert "_on_poll" in [h._callback.__name__ for h in ours(lf)]
    finally:
        task.cancel()
        os.close(out)
        os.close(err)
        lf.close()
    assert sorted(lf.tail("u-m")) == [("stderr", "by poll"), ("stdout", "by event")]
    (said,) = [r["message"] for r in records if r["level"].name == "DEBUG"]
    assert "No space left on device" in said and "u-m.stderr.log" in said


async def test_a_flood_is_read_a_budget_per_tick_and_delivered_whole_in_order(tmp_path, records):
    interval = 1.0
    lf = LogFiles(tmp_path, interval=interval)
    out, err = lf.open_for_child("u", "u-fl")
    lf.follow("u", "u-fl", 1, from_start=True)
    task = asyncio.create_task(lf.run())
    lines = [f"flood {i}" for i in range(LINE_BUDGET * 2 + 500)]  # 3 ticks
    try:
        await asyncio.sleep(0)
        start = time.monotonic()
        os.write(out, "".join(line + "\n" for line in lines).encode())
        await until(lambda: len(messages(records, "u-fl")) >= LINE_BUDGET)
        assert len(messages(records, "u-fl")) == LINE_BUDGET  # the rest waits for the tick
        assert "_resume" in [h._callback.__name__ for h in ours(lf)]
        await until(lambda: len(messages(records, "u-fl")) == len(lines), within=10)
        elapsed = time.monotonic() - start
        await until(lambda: not ours(lf), within=2 * interval)  # caught up: no timer left
    finally:
        task.cancel()
        os.close(out)
        os.close(err)
        lf.close()
    assert messages(records, "u-fl") == lines
    assert elapsed >= 1.5 * interval  # three ticks: now, +1 s, +2 s


async def test_a_file_written_all_the_time_wakes_the_follower_once_a_gap(tmp_path, monkeypatch):
    gap = 0.2
    lf = LogFiles(tmp_path, interval=60, gap=gap)
    readable: list[float] = []  # the loop woke lf up: events queued
    handled: list[float] = []  # lf read the events (then, or at the end of a gap)
    on_readable, on_events = lf._on_readable, lf._on_events

    def spy_readable() -> None:
        readable.append(time.monotonic())
        on_readable()

    def spy_events() -> bool:
        handled.append(time.monotonic())
        return on_events()

    monkeypatch.setattr(lf, "_on_readable", spy_readable)
    monkeypatch.setattr(lf, "_on_events", spy_events)
    out, err = lf.open_for_child("u", "u-g")
    lf.follow("u", "u-g", 1, from_start=True)
    task = asyncio.create_task(lf.run())
    lines = [f"g{i}" for i in range(100)]
    try:
        await asyncio.sleep(0)
        start = time.monotonic()
        for line in lines:  # 100 writes over >= 0.5 s
            os.write(out, line.encode() + b"\n")
            await asyncio.sleep(0.005)
        await until(lambda: len(lf.tail("u-g")) == len(lines), within=5)
        elapsed = time.monotonic() - start
        await until(lambda: not ours(lf), within=2)  # listening again, no timer
        os.write(out, b"later\n")
        await until(lambda: lf.tail("u-g")[-1] == ("stdout", "later"), within=5)
    finally:
        task.cancel()
        os.close(out)
        os.close(err)
        lf.close()
    assert lf.tail("u-g") == [("stdout", line) for line in [*lines, "later"]]
    most = elapsed / gap + 3  # 100 without the gap
    assert 2 <= len(handled) <= most and len(readable) <= most, (handled, readable, elapsed)
    assert all(b - a >= gap * 0.9 for a, b in itertools.pairwise(handled))


async def test_unfollow_and_forget_drop_the_watches_and_leak_no_fd(tmp_path, monkeypatch):
    before = open_fds()
    lf = LogFiles(tmp_path, interval=60)
    passed = count_passes(lf, monkeypatch)
    a_out, a_err = lf.open_for_child("u", "u-a")
    b_out, b_err = lf.open_for_child("u", "u-b")
    lf.follow("u", "u-a", 1, from_start=True)
    lf.follow("u", "u-b", 1, from_start=True)
    task = asyncio.create_task(lf.run())
    try:
        await asyncio.sleep(0)
        assert lf._inotify is not None
        ino = lf._inotify.fd
        assert len(lf._watches) == 4
        assert len(inotify_watches(ino)) == 4
        lf.forget("u-a")
        assert {f.instance_id for files in lf._watches.values() for f in files} == {"u-b"}
        assert len(inotify_watches(ino)) == 2  # as the kernel sees them
        passed.clear()
        os.write(a_out, b"nobody reads this\n")
        os.write(b_out, b"b reads this\n")
        await until(lambda: lf.tail("u-b") == [("stdout", "b reads this")])
        await asyncio.sleep(0.05)
        assert {f.instance_id for f in passed} == {"u-b"}
        assert lf.tail("u-a") == []
        lf.unfollow("u-b")  # the last watch: the inotify fd goes with it
        assert lf._watches == {} and lf._inotify is None
        assert not asyncio.get_running_loop().remove_reader(ino)
        os.write(b_out, b"after unfollow\n")
        await asyncio.sleep(0.05)
        assert lf.tail("u-b") == [("stdout", "b reads this")]
        lf.follow("u", "u-b", 1)  # a new watch, a new inotify fd, still read by run()
        os.write(b_out, b"again\n")
        await until(lambda: lf.tail("u-b")[-1] == ("stdout", "again"))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for fd in (a_out, a_err, b_out, b_err):
            os.close(fd)
    reader = lf._inotify.fd if lf._inotify is not None else None
    assert reader is not None
    assert not asyncio.get_running_loop().remove_reader(reader)  # run() took it away
    lf.close()
    assert lf._inotify is None
    assert open_fds() == before


async def test_a_queue_overflow_reads_every_watched_file(tmp_path, monkeypatch):
    lf = LogFiles(tmp_path, interval=60)
    out, err = lf.open_for_child("u", "u-o")
    lf.follow("u", "u-o", 1, from_start=True)
    task = asyncio.create_task(lf.run())
    try:
        await asyncio.sleep(0)
        assert lf._inotify is not None
        os.write(out, b"o\n")
        os.write(err, b"e\n")
        monkeypatch.setattr(lf._inotify, "read", lambda: [(-1, IN_Q_OVERFLOW)])
        lf._on_events()
        # each file read now, or 2 ms later if the rotation thread held it
        # (BUSY_RETRY); the patched read() hides the real events, and the
        # tick is a minute away: only the overflow can have read them
        await until(lambda: len(lf.tail("u-o")) >= 2, within=5)
        assert sorted(lf.tail("u-o")) == [("stderr", "e"), ("stdout", "o")]
    finally:
        task.cancel()
        os.close(out)
        os.close(err)
        lf.close()


async def test_files_prepared_on_a_thread_and_followed_through_the_spawn_s_fds(tmp_path, records):
    lf = LogFiles(tmp_path / "logs", interval=0.01)
    # what the spawn thread does: the unit's directory and both files, closed again
    await asyncio.to_thread(lf.prepare, "u", "u-t")
    out_path, err_path = lf.paths("u", "u-t")
    assert {p.name for p in out_path.parent.iterdir()} == {out_path.name, err_path.name}
    assert (out_path.parent.stat().st_mode & 0o777, out_path.stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )
    task = asyncio.create_task(lf.run())
    out, err = lf.open_for_child("u", "u-t")
    try:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a vfork+exec, as the kernel does
            [sys.executable, "-c", "print('hello', flush=True)"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        lf.follow("u", "u-t", proc.pid, from_start=True, fds=(out, err))
    finally:
        os.close(out)
        os.close(err)
    try:
        await until(lambda: lf.tail("u-t") == [("stdout", "hello")])
        assert messages(records, "u-t") == ["hello"]
        # the follower keeps no fd of the files between reads, nor the spawn's
        held = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                held.add(os.readlink(f"/proc/self/fd/{fd}"))
        assert not held & {str(out_path), str(err_path)}
    finally:
        stop(proc)
        lf.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
