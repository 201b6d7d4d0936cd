"""What the benchmarks share: the process tracker, the docs section writer.

Imported by ``bench/supervision.py`` and ``bench/routing.py`` (run as scripts,
so this directory is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
#: every process a run starts carries it in its environment (HSU_BENCH_RUN)
RUN_MARK = f"hsu-bench-{uuid.uuid4().hex[:12]}"

PREAMBLE = """\
# Benchmarks

Each section is written by its benchmark and replaced, alone, when that
benchmark runs again. Numbers come from whatever machine ran it last; see each
section for the machine and the versions.

"""


class Tracker:
    """Every process this run started or saw, to stop them all and prove it."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def add(self, pids: Iterable[int]) -> None:
        for pid in pids:
            if pid in self.seen:
                continue
            try:
                self.seen[pid] = psutil.Process(pid).create_time()
            except psutil.Error:
                continue

    def alive(self) -> list[psutil.Process]:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def marked(self) -> list[psutil.Process]:
        """Processes carrying this run's mark in their environment."""
        out = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get("HSU_BENCH_RUN") == RUN_MARK:
                    out.append(p)
            except psutil.Error:
                continue
        return out


TRACKER = Tracker()


def leftovers() -> list[psutil.Process]:
    """What this run started and is still alive (tracked, or carrying its mark)."""
    seen = {p.pid: p for p in TRACKER.alive()}
    for p in TRACKER.marked():
        seen.setdefault(p.pid, p)
    return list(seen.values())


def reap_leftovers(failed: BaseException | None = None) -> None:
    """SIGKILL what this run started and is still alive (see
    :func:`leftovers`), say so, and end the run with an error unless it is
    already failing with ``failed``: a benchmark that leaks a process has a
    bug, like a test that does."""
    left = leftovers()
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if left:
        msg = f"LEAKED PROCESSES (now SIGKILLed): {', '.join(str(p.pid) for p in left)}"
        print(msg, file=sys.stderr)
        if failed is None:
            raise SystemExit(msg)


def interrupted(signum: int, frame: Any) -> None:
    """A SIGTERM handler: unwind as for Ctrl-C, so the cleanup still runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def versions(*dists: str) -> dict[str, str]:
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "?"
    return out


def write_section(body: str, heading: str, path: Path = DOC, keep: bool = False) -> None:
    """Replace the ``heading`` section (up to the next ``## ``) or append it.

    With ``keep``, the old section's ``### `` subsections that ``body`` does
    not write itself (notes and analyses written by hand beside the
    generated table) are kept after it, in their order."""
    text = path.read_text() if path.exists() else PREAMBLE
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = body.rstrip("\n") + "\n"
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        if keep:
            written = {line.rstrip() for line in body.splitlines() if line.startswith("### ")}
            kept: list[str] = []
            keeping = False
            for line in lines[start + 1 : end]:
                if line.startswith("### "):
                    keeping = line.rstrip() not in written
                if keeping:
                    kept.append(line)
            if kept:
                section += "\n" + "".join(kept).rstrip("\n") + "\n"
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.write_text(new)


def trees_and_limits(specs: Iterable[str]) -> dict[str, Path | None]:
    """The trees of ``--tree LABEL=DIR`` options, after ``this`` (None: this
    checkout); raises the soft open-files limit to at least 4096 (the hard
    one permitting) and prints the load average at the start."""
    import resource

    trees: dict[str, Path | None] = {"this": None}
    for spec in specs:
        name, _, path = spec.partition("=")
        trees[name] = Path(path).resolve()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    return trees
