"""Resource limits of supervised processes: sampled thresholds and spawn-time rlimits.

A unit's ``limits`` section (:class:`ResourceLimits`) holds warning thresholds
checked every ``interval`` seconds against a :class:`Usage` read by a
:class:`Sampler`, the action to take on a breach, and POSIX rlimits set at
spawn by util-linux's ``prlimit`` in front of the command, which then execs it
(:func:`hsu.process.rlimits_argv`): no ``preexec_fn``, as that makes :class:`subprocess.Popen`
fork() a kernel whose gRPC threads make fork unsafe.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import resource
import sys
import time
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

import attrs
import psutil

from hsu.config import Seconds
from hsu.ports import Usage
from hsu.process import RESOURCES, RLIM_MAX, UNLIMITED

MIB = 1024 * 1024

_NR_OPEN = "/proc/sys/fs/nr_open"


class LimitAction(enum.StrEnum):
    """What the kernel does when a threshold is exceeded."""

    LOG = "log"
    RESTART = "restart"
    STOP = "stop"


_optional_ge0 = attrs.validators.optional(attrs.validators.ge(0))


@attrs.frozen
class ResourceLimits:
    """A unit's ``limits`` section; every field has a default, so it may be omitted.

    Thresholds are warnings checked on each sample; ``None`` means not checked.
    """

    #: seconds between two samples
    interval: Seconds = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    #: resident memory of the process and all its descendants, MiB
    rss_mb: float | None = attrs.field(default=None, validator=_optional_ge0)
    #: CPU of the process and its descendants, percent of one core over the interval
    cpu_percent: float | None = attrs.field(default=None, validator=_optional_ge0)
    #: file descriptors of the main process
    open_files: int | None = attrs.field(default=None, validator=_optional_ge0)
    #: threads of the process and its descendants
    threads: int | None = attrs.field(default=None, validator=_optional_ge0)
    #: number of descendant processes
    children: int | None = attrs.field(default=None, validator=_optional_ge0)
    action: LimitAction = LimitAction.LOG
    #: POSIX rlimits set at spawn, soft and hard both (-1: unlimited); checked
    #: by :func:`check_rlimits`
    rlimits: Mapping[str, int] = attrs.field(factory=dict)


def _suggest(key: str, valid: list[str]) -> str:
    import difflib  # not at start (docs/benchmarks.md, Footprint)

    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _nr_open() -> int | None:
    """The kernel's ceiling on RLIMIT_NOFILE, which binds root too (Linux)."""
    try:
        with open(_NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _above(value: int, limit: int) -> bool:
    if limit == resource.RLIM_INFINITY:
        return False
    return value == UNLIMITED or value > limit


def check_rlimits(rlimits: Mapping[str, int], *, privileged: bool | None = None) -> list[str]:
    """Every problem with a unit's ``rlimits``, one message each (empty: fine).

    Raising a hard limit needs privilege: unless ``privileged`` (default: the
    kernel runs as root), a value above the kernel process's own hard limit
    cannot be applied in the child, and is reported here rather than at spawn.
    """
    if privileged is None:
        privileged = os.geteuid() == 0
    problems: list[str] = []
    seen: dict[int, str] = {}
    for name, value in rlimits.items():
        where = f"rlimits.{name}"
        res = RESOURCES.get(name)
        if res is None:
            problems.append(f"{where}: unknown resource{_suggest(name, sorted(RESOURCES))}")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
            continue
        if value < UNLIMITED:
            problems.append(f"{where}: {value} is negative (-1 means unlimited)")
            continue
        if value > RLIM_MAX:
            problems.append(f"{where}: {value} is too large (at most {RLIM_MAX})")
            continue
        if res in seen:
            problems.append(f"{where}: the same resource as {seen[res]!r}")
            continue
        seen[res] = name
        shown = "unlimited" if value == UNLIMITED else str(value)
        _, hard = resource.getrlimit(res)
        ceiling = _nr_open() if res == resource.RLIMIT_NOFILE else None
        if not privileged and _above(value, hard):
            problems.append(
                f"{where}: {shown} exceeds the hard limit {hard} of this process "
                "(raising it needs privilege)"
            )
        elif ceiling is not None and _above(value, ceiling):
            problems.append(f"{where}: {shown} exceeds the system maximum {ceiling} ({_NR_OPEN})")
    return problems


@attrs.define
class _Seen:
    """A process as of the last sample: its create time (a reused pid has
    another) and its CPU seconds."""

    create_time: float
    cpu: float


@attrs.define
class _Tree:
    """A sampled root: when it was sampled and the descendants it had."""

    at: float
    members: frozenset[int]


class _Stat(NamedTuple):
    """One live, non-zombie process as one read shows it (a tuple: made for
    every process of every sample)."""

    pid: int
    ppid: int
    #: user + system CPU seconds
    cpu: float
    #: seconds since the epoch (boot time + start ticks), as psutil's ``create_time()``
    create_time: float
    #: resident bytes, as psutil's ``memory_info().rss``
    rss: int
    threads: int


_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)
#: read /proc/<pid>/stat directly (else psutil, off Linux)
_PROCFS = sys.platform.startswith("linux") and os.path.isfile("/proc/self/stat")


@functools.cache
def _proc_constants() -> tuple[float, int, int]:
    """(boot time, clock ticks per second, page size), read once per process:
    psutil re-reads the boot time from /proc/stat for every ``create_time()``."""
    boot = 0.0
    with contextlib.suppress(OSError, ValueError), open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                boot = float(line.split()[1])
                break
    return boot, os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")


def _read_line(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)  # one line, well under a page
    finally:
        os.close(fd)


def _read_proc(pid: int) -> _Stat | None:
    """/proc/<pid>/stat and statm, one read each (fields in proc(5)); None if
    the process is gone, a zombie, or cannot be read.

    The resident pages come from statm, as psutil's: stat's ``rss`` field is
    the kernel's approximate per-CPU counter (on Linux 6.18, 405 pages against
    statm's 448 for a ``sleep``), statm's the exact sum."""
    try:
        data = _read_line(f"/proc/{pid}/stat")
        # after "pid (comm) ", where comm may hold spaces and parentheses
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        resident = int(_read_line(f"/proc/{pid}/statm").split()[1])
        boot, ticks, page = _proc_constants()
        return _Stat(
            pid=pid,
            ppid=int(fields[1]),
            cpu=(int(fields[11]) + int(fields[12])) / ticks,
            create_time=boot + int(fields[19]) / ticks,
            rss=resident * page,
            threads=int(fields[17]),
        )
    except (OSError, ValueError, IndexError):
        return None


def _read_psutil(pid: int) -> _Stat | None:
    """:func:`_read_proc` through psutil, where there is no /proc."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            times = proc.cpu_times()
            return _Stat(
                pid=pid,
                ppid=proc.ppid(),
                cpu=times.user + times.system,
                create_time=proc.create_time(),
                rss=proc.memory_info().rss,
                threads=proc.num_threads(),
            )
    except _GONE:
        return None


_read = _read_proc if _PROCFS else _read_psutil


def _open_files(pid: int) -> int | None:
    """File descriptors ``pid`` has open; None if it cannot be read."""
    if _PROCFS:
        try:
            return len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return None
    try:
        return psutil.Process(pid).num_fds()
    except _GONE:
        return None


def _read_all(path: str) -> bytes:
    """A /proc file that may be longer than one read (a page at a time)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data
    finally:
        os.close(fd)


@functools.cache
def _children_files() -> bool:
    """Whether /proc lists each task's children (Linux's CONFIG_PROC_CHILDREN)."""
    return _PROCFS and os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children(st: _Stat) -> list[int] | None:
    """The pids of ``st``'s children from ``/proc/<pid>/task/<pid>/children``,
    one read; None where that file does not list them all: a process with
    more than one thread (each thread's children are in its own file), or
    no such files."""
    if st.threads != 1 or not _children_files():
        return None
    try:
        return [int(n) for n in _read_all(f"/proc/{st.pid}/task/{st.pid}/children").split()]
    except FileNotFoundError:
        return []  # gone since its stat was read
    except (OSError, ValueError):
        return None


def _host_children() -> dict[int, list[int]]:
    """Every process on the host, by parent pid (one read of each's stat)."""
    found: dict[int, list[int]] = {}
    if not _PROCFS:
        for proc in psutil.process_iter(["ppid"]):
            found.setdefault(proc.info["ppid"], []).append(proc.pid)
        return found
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                data = _read_line(f"/proc/{name}/stat")
                ppid = int(data[data.rindex(b")") + 2 :].split(maxsplit=2)[1])
            except (OSError, ValueError, IndexError):
                continue
            found.setdefault(ppid, []).append(int(name))
    return found


def _descendants(main: _Stat, host: list[dict[int, list[int]]]) -> list[_Stat]:
    """The live, non-zombie descendants of ``main``: each process's children
    from its children file (:func:`_children`), else from the host's
    processes, listed once in ``host`` for all the roots of a sample."""
    out: list[_Stat] = []
    seen = {main.pid}
    stack = [main]
    while stack:
        parent = stack.pop()
        kids = _children(parent)
        if kids is None:
            if not host:
                host.append(_host_children())
            kids = host[0].get(parent.pid, [])
        for pid in kids:
            if pid in seen:
                continue
            seen.add(pid)
            child = _read(pid)
            if child is not None and child.ppid == parent.pid:
                out.append(child)
                stack.append(child)
    return out


class Sampler:
    """Reads :class:`Usage` of process trees, remembering what CPU delta needs.

    Each process is read with one read of ``/proc/<pid>/stat`` (CPU times,
    start time, threads) and one of ``statm`` (resident pages; psutil where
    there is no /proc), and its open files counted in ``/proc/<pid>/fd``.
    What is remembered of a pid is checked against its create time on every
    sample, so a reused pid starts afresh. ``cpu_percent`` is the CPU time
    the tree used since the previous sample of the same root, over the wall
    time between them: the first sample of a root (or after :meth:`forget`,
    or pid reuse) reports 0.0. A descendant that appeared since counts all
    its CPU time; one that exited in between loses what it used in its last
    interval.

    The figures are psutil's: ``memory_info().rss`` is the same resident page
    count (statm's), ``cpu_times()`` the same ticks, and
    ``create_time()`` the same start ticks after the boot time (read once
    here, not per call). Without a cgroup, the descendants are the
    processes whose parent is in the tree, as psutil's
    ``children(recursive=True)`` finds them: a one-thread process's children
    are read from its ``/proc/<pid>/task/<pid>/children`` (one read; a
    ``sleep`` has none), anyone else's from every process's stat on the host,
    read once for all the roots of :meth:`sample_many` (once per
    :meth:`sample`), so the cost follows the instances, not the host's
    processes (docs/benchmarks.md, "`hsu status` with 1,000 running"). Like
    psutil's listing, a child born during the walk may be missed. CPU times
    tick at 10 ms, so ``cpu_percent`` is only meaningful over intervals of a
    second or more.
    """

    def __init__(self) -> None:
        self._seen: dict[int, _Seen] = {}
        self._trees: dict[int, _Tree] = {}

    def forget(self, pid: int) -> None:
        """Drop what is remembered about the tree rooted at ``pid``."""
        tree = self._trees.pop(pid, None)
        self._seen.pop(pid, None)
        if tree is not None:
            for member in tree.members:
                self._seen.pop(member, None)

    def _seen_as(self, st: _Stat) -> _Seen | None:
        """What is remembered of ``st``'s pid, if it is the same process."""
        seen = self._seen.get(st.pid)
        return seen if seen is not None and seen.create_time == st.create_time else None

    def sample(self, pid: int, cgroup: Collection[int] | None = None) -> Usage | None:
        """The usage of ``pid`` and its descendants; None if it is gone, a zombie,
        or cannot be read. Descendants that vanish or cannot be read meanwhile
        are left out.

        ``cgroup``: the processes of the instance's cgroup, counted instead of
        the descendants (a process that left the tree still counts, and no
        listing of the host's processes is needed)."""
        return self._sample(pid, cgroup, [])

    def sample_many(
        self, roots: Iterable[tuple[int, Collection[int] | None]], *, open_files: bool = True
    ) -> list[Usage | None]:
        """:meth:`sample` of each ``(pid, cgroup)``, the host's processes
        listed at most once for all of them. Without ``open_files`` the
        descriptors are not counted (one read of /proc less per root; each
        usage's ``open_files`` is 0): the metrics' sampling does not show them."""
        host: list[dict[int, list[int]]] = []
        return [self._sample(pid, cgroup, host, open_files) for pid, cgroup in roots]

    def _sample(
        self,
        pid: int,
        cgroup: Collection[int] | None,
        host: list[dict[int, list[int]]],
        count_files: bool = True,
    ) -> Usage | None:
        main = _read(pid)
        seen = None if main is None else self._seen_as(main)
        if main is not None and seen is None and pid in self._trees:
            self.forget(pid)  # the pid was reused
        open_files = None if main is None else _open_files(pid) if count_files else 0
        if main is None or open_files is None:
            self.forget(pid)
            return None
        now = time.monotonic()
        if cgroup is not None:
            descendants = [st for m in cgroup if m != pid and (st := _read(m)) is not None]
        else:
            descendants = _descendants(main, host)

        tree = self._trees.get(pid)
        used = 0.0 if seen is None else max(main.cpu - seen.cpu, 0.0)
        self._seen[pid] = _Seen(main.create_time, main.cpu)
        rss, threads = main.rss, main.threads
        members: set[int] = set()
        for child in descendants:
            child_seen = self._seen_as(child)
            if child_seen is not None:
                used += max(child.cpu - child_seen.cpu, 0.0)
            elif tree is not None:
                used += child.cpu  # appeared since the last sample
            rss += child.rss
            threads += child.threads
            members.add(child.pid)
            self._seen[child.pid] = _Seen(child.create_time, child.cpu)

        if tree is not None:
            for gone in tree.members - members:
                self._seen.pop(gone, None)
        elapsed = now - tree.at if tree is not None else 0.0
        self._trees[pid] = _Tree(now, frozenset(members))
        return Usage(
            pid=pid,
            rss=rss,
            cpu_percent=used / elapsed * 100.0 if elapsed > 0 else 0.0,
            open_files=open_files,
            threads=threads,
            children=len(members),
        )


def breaches(limits: ResourceLimits, usage: Usage) -> list[str]:
    """One line per threshold of ``limits`` that ``usage`` exceeds."""
    out: list[str] = []
    rss_mb = usage.rss / MIB
    if limits.rss_mb is not None and rss_mb > limits.rss_mb:
        out.append(f"rss {rss_mb:.1f} MiB > limit {limits.rss_mb:g} MiB")
    if limits.cpu_percent is not None and usage.cpu_percent > limits.cpu_percent:
        out.append(f"cpu {usage.cpu_percent:.1f}% > limit {limits.cpu_percent:g}%")
    counts = (
        ("open files", usage.open_files, limits.open_files),
        ("threads", usage.threads, limits.threads),
        ("children", usage.children, limits.children),
    )
    for label, value, limit in counts:
        if limit is not None and value > limit:
            out.append(f"{label} {value} > limit {limit}")
    return out


# -- the kernel's own open-files limit ----------------------------------------

#: the soft RLIMIT_NOFILE this process had before :func:`raise_open_files`
#: raised it (None: it was not raised), for the processes it spawns
_started_with: int | None = None
_raised = False


def raise_open_files() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, once per process.

    A kernel holds a pidfd per instance (its log files only while it reads
    them) and a socket per connection: the common soft limit of 1024 would stop it at a
    few hundred instances although the hard limit (what the administrator
    allows) is far above. Returns the soft limit it started with, which the
    kernel's children get back (:attr:`hsu.ports.LaunchSpec.nofile_soft`: a
    program using ``select()`` breaks above 1024), or None if nothing changed.
    As Go's runtime does since 1.19.
    """
    global _started_with, _raised
    if _raised:
        return _started_with
    _raised = True
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY or target > RLIM_MAX:
        try:  # the kernel's own ceiling for RLIMIT_NOFILE
            with open(_NR_OPEN) as f:
                target = int(f.read())
        except (OSError, ValueError):
            return None
    if soft != resource.RLIM_INFINITY and soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return None
    _started_with = soft
    return soft


def open_files_note() -> str:
    """How many files this process has open against its limit, for an error
    that says EMFILE: what to change and where."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        count = str(len(os.listdir("/proc/self/fd")))
    except OSError:
        count = "?"
    return (
        f"the kernel has {count} files open and may open {soft} (RLIMIT_NOFILE, hard"
        f" limit {hard}): raise the limit (systemd LimitNOFILE=, `ulimit -n` before"
        " `hsu run`) or run fewer instances"
    )
