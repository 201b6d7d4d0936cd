"""Resource limits of supervised processes: sampled thresholds and spawn-time rlimits.

A unit's ``limits`` section (:class:`ResourceLimits`) holds warning thresholds
checked every ``interval`` seconds against a :class:`Usage` read by a
:class:`Sampler`, the action to take on a breach, and POSIX rlimits set at
spawn by util-linux's ``prlimit`` in front of the command, which then execs it
(:func:`hsu.process.rlimits_argv`): no ``preexec_fn``, as that makes :class:`subprocess.Popen`
fork() a kernel whose gRPC threads make fork unsafe.
"""

from __future__ import annotations

import difflib
import enum
import os
import resource
import time
from collections.abc import Collection, Iterable, Mapping

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
    """A process as of the last sample: the object read through and its CPU seconds."""

    proc: psutil.Process
    create_time: float
    cpu: float


@attrs.define
class _Tree:
    """A sampled root: when it was sampled and the descendants it had."""

    at: float
    members: frozenset[int]


_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


class Sampler:
    """Reads :class:`Usage` of process trees, remembering what CPU delta needs.

    Processes are cached by pid, each checked against its create time on every
    sample so a reused pid starts afresh. ``cpu_percent`` is the CPU time the tree
    used since the previous sample of the same root, over the wall time between
    them: the first sample of a root (or after :meth:`forget`, or pid reuse)
    reports 0.0. A descendant that appeared since counts all its CPU time; one
    that exited in between loses what it used in its last interval.

    Cost, measured: 1.8-2.9 ms per sample of a root with 3 children (best of
    5x200 runs; 74-85 processes on the host; 2 shared cores), of which ~85% is
    ``children(recursive=True)`` reading ``/proc/*/stat`` of every process on
    the host, so it grows with the host's process count, not the tree's. With::

        python -c "import subprocess, timeit; from hsu._kernel.supervision.resources import Sampler
        kids = [subprocess.Popen(['sleep', '60']) for _ in range(3)]
        s = Sampler(); p = __import__('os').getpid()
        print(min(timeit.repeat(lambda: s.sample(p), number=200, repeat=5)) / 200)
        [k.kill() for k in kids]"

    So 50 roots cost ~100-150 ms per interval: spread their samples over the
    interval (or run them in a worker thread) rather than taking all at once.
    CPU times tick at 10 ms, so ``cpu_percent`` is only meaningful over
    intervals of a second or more.
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

    def _cached(self, fresh: psutil.Process) -> tuple[psutil.Process, _Seen | None]:
        """The cached object for ``fresh``'s pid if it is the same process, with its entry."""
        seen = self._seen.get(fresh.pid)
        if seen is not None and seen.create_time == fresh.create_time():
            return seen.proc, seen
        return fresh, None

    def sample(self, pid: int, cgroup: Collection[int] | None = None) -> Usage | None:
        """The usage of ``pid`` and its descendants; None if it is gone, a zombie,
        or cannot be read. Descendants that vanish or cannot be read meanwhile
        are left out.

        ``cgroup``: the processes of the instance's cgroup, counted instead of
        the descendants (a process that left the tree still counts, and no
        listing of the host's processes is needed)."""
        try:
            fresh = psutil.Process(pid)
            proc, seen = self._cached(fresh)
            if seen is None and pid in self._trees:
                self.forget(pid)  # the pid was reused
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.ZombieProcess(pid)
                create_time = proc.create_time()
                times = proc.cpu_times()
                rss = proc.memory_info().rss
                threads = proc.num_threads()
                open_files = proc.num_fds()
            now = time.monotonic()
            if cgroup is not None:
                descendants = _processes(m for m in cgroup if m != pid)
            else:
                try:
                    descendants = proc.children(recursive=True)
                except psutil.AccessDenied:
                    descendants = []
        except _GONE:
            self.forget(pid)
            return None

        tree = self._trees.get(pid)
        cpu_now = times.user + times.system
        used = 0.0 if seen is None else max(cpu_now - seen.cpu, 0.0)
        self._seen[pid] = _Seen(proc, create_time, cpu_now)
        members: set[int] = set()
        for child in descendants:
            try:
                child, child_seen = self._cached(child)
                with child.oneshot():
                    if child.status() == psutil.STATUS_ZOMBIE:
                        continue
                    child_times = child.cpu_times()
                    child_rss = child.memory_info().rss
                    child_threads = child.num_threads()
                    child_created = child.create_time()
            except _GONE:
                continue
            child_cpu = child_times.user + child_times.system
            if child_seen is not None:
                used += max(child_cpu - child_seen.cpu, 0.0)
            elif tree is not None:
                used += child_cpu  # appeared since the last sample
            rss += child_rss
            threads += child_threads
            members.add(child.pid)
            self._seen[child.pid] = _Seen(child, child_created, child_cpu)

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


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except _GONE:
            continue
    return found


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
