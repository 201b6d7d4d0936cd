"""The kernel following the stdout/stderr files of its HSUs: real files, real processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from hsu.logfiles import LINE_BUDGET, LogFiles

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
        lf.poll()  # "part" was written before "e1", so it has been read by now
        assert lf.tail("u-1", stream="stdout") == [("stdout", "one")]
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
    assert (tmp_path / "logs" / "u" / "u-1.stdout.log").stat().st_mode & 0o777 == 0o640
    assert messages(records, "u-1") == stdout
    assert messages(records, "u-1", "stderr") == stderr
    extras = {
        (r["extra"]["unit"], r["extra"]["pid"], r["extra"]["stream"], r["level"].name)
        for r in records
        if r["extra"].get("instance") == "u-1"
    }
    assert extras == {("u", proc.pid, "stdout", "INFO"), ("u", proc.pid, "stderr", "INFO")}


async def test_rotation_keeps_backups_and_logs_every_line_once_in_order(tmp_path, records):
    lf = LogFiles(tmp_path, max_bytes=4096, backups=2, interval=0.01)
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
    lf = LogFiles(tmp_path, max_bytes=4096, backups=2, interval=0.001)
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
    assert numbers and all(a < b for a, b in itertools.pairwise(numbers))
    names = sorted(p.name for p in (tmp_path / "u").iterdir())
    assert names == ["u-f.stderr.log", "u-f.stdout.log", "u-f.stdout.log.1", "u-f.stdout.log.2"]


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
    stdout.unlink()
    os.write(out, b"last words\n")
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
