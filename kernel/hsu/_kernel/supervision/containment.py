"""Containment: what an instance starts ends with it, and no exit stays unreaped.

A signal to an HSU's process group misses whatever left the group (a daemon
that forks, calls ``setsid`` and forks again). The kernel catches those in
two ways, picked when it starts and named in its log:

- **cgroup v2**, where this process's cgroup is writable: each instance gets
  its own cgroup, ``<the kernel's cgroup>/hsu-<pid>-<start>/<instance id>``
  (the kernel's pid and start time), which the process joins before its command runs
  (:func:`hsu.process.cgroup_argv`). When the instance ends, its cgroup is
  killed (``cgroup.kill``; on kernels before 5.14 every pid in
  ``cgroup.procs`` gets SIGKILL) and removed. Exact: no process can leave a
  cgroup without write access to another one. No controller is enabled, so
  the "no internal processes" rule never applies: the kernel stays where it is.
- **the child subreaper** otherwise (``PR_SET_CHILD_SUBREAPER``, set in any
  case): a process whose parent dies is re-parented to the kernel rather than
  to init, so it stays in the kernel's tree; when an instance ends, every
  process whose environment still names it (``HSU_INSTANCE_ID`` in
  ``/proc/PID/environ``) gets SIGKILL. A process that scrubs its environment
  escapes this one.

``HSU_CONTAINMENT=subreaper`` in the kernel's environment turns cgroups off
(``cgroup`` insists on them and warns when they are not there; ``auto`` is
the default).

**Reaping.** A subreaper (and a kernel that is PID 1 of a container) inherits
every orphan below it, and must reap them. On SIGCHLD (or once a second,
where the kernel cannot take SIGCHLD: not on the main thread, or another
handler holds it) the kernel reaps its zombie children that nobody else waits
for. It never takes the exit status of a process it started itself (an
instance's leader, reaped through its pidfd, or any ``subprocess`` child):
a process the kernel forked is in the kernel's session or leads its own
(``setsid``), so a zombie child in a third session was not forked by the
kernel. The others it reaps are those it knows as an instance's: in an
instance's cgroup, or killed by :meth:`Containment.end`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

from loguru import logger

from hsu.process import cgroup_argv

#: what chooses the mechanism: ``auto`` (default), ``cgroup`` or ``subreaper``
ENV_CONTAINMENT = "HSU_CONTAINMENT"
#: the variable every instance's processes inherit (set by the supervisor)
ENV_INSTANCE_ID = "HSU_INSTANCE_ID"
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
#: seconds between two reaps where SIGCHLD is not ours to take
REAP_INTERVAL = 1.0
#: seconds a killed cgroup gets to empty before the kernel gives up removing it
EMPTY_TIMEOUT = 5.0
#: seconds after which an empty cgroup of a kernel that is gone is removed
STALE_AGE = 60.0

Mode = Literal["cgroup", "subreaper", "none"]

# -- the child subreaper (process-wide) ------------------------------------------

_subreaper_lock = threading.Lock()
_subreaper_users = 0
#: whether this module set the flag (and so clears it when the last user goes)
_subreaper_set_here = False


def _prctl(option: int, arg: object) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    return int(libc.prctl(ctypes.c_int(option), arg, zero, zero, zero))


def is_subreaper() -> bool:
    """Whether this process is a child subreaper."""
    flag = ctypes.c_int(0)
    if _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag)) != 0:
        return False
    return bool(flag.value)


def _acquire_subreaper() -> bool:
    """Make this process a child subreaper (idempotent); True if it is one."""
    global _subreaper_users, _subreaper_set_here
    with _subreaper_lock:
        if _subreaper_users == 0 and not is_subreaper():
            _subreaper_set_here = _prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1)) == 0
        _subreaper_users += 1
        return is_subreaper()


def _release_subreaper() -> None:
    global _subreaper_users, _subreaper_set_here
    with _subreaper_lock:
        _subreaper_users = max(0, _subreaper_users - 1)
        if _subreaper_users == 0 and _subreaper_set_here:
            _prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(0))
            _subreaper_set_here = False


# -- /proc -------------------------------------------------------------------------


class _Stat:
    """What the kernel reads of ``/proc/PID/stat``."""

    __slots__ = ("pgid", "ppid", "sid", "start", "state")

    def __init__(self, raw: bytes):
        # the command name may hold spaces and parentheses: fields start after the last ')'
        fields = raw[raw.rindex(b")") + 2 :].split()
        self.state = fields[0].decode()
        self.ppid, self.pgid, self.sid = int(fields[1]), int(fields[2]), int(fields[3])
        self.start = int(fields[19])


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _Stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:
        return False


def cgroup_of(pid: int | str) -> str | None:
    """The process's cgroup v2 path (``/a/b``, relative to the hierarchy's root)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


def _unescape(field: str) -> str:
    """A mountinfo field: spaces and the like are written as octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _quiet_wakeup_fd(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop's signal wake-up fd fill up without a word.

    ``add_signal_handler`` points Python's C signal handler at the loop's
    self-pipe, warning when it is full. A burst of exits (1,000 instances
    stopped at once) sends SIGCHLD faster than a busy loop reads the pipe:
    each signal past a few hundred printed "Exception ignored when trying
    to write to the signal wakeup fd: BlockingIOError" on stderr. A full
    pipe loses nothing the reaper needs (the loop is woken already, and one
    SIGCHLD reaps every exited child), so the warning is turned off, on the
    same fd (no window with none)."""
    sock = getattr(loop, "_csock", None)  # asyncio's selector loops (the only ones here)
    if sock is None:
        return
    fd = sock.fileno()
    with contextlib.suppress(ValueError, OSError):
        old = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        if old not in (fd, -1):  # not the loop's: leave it as it was
            signal.set_wakeup_fd(old)


class CgroupHome(NamedTuple):
    """Where this process is in the cgroup v2 hierarchy, and where that is mounted."""

    #: this process's cgroup directory
    directory: Path
    #: its path in the hierarchy (``/a/b``), as ``/proc/PID/cgroup`` writes it
    path: str
    #: the hierarchy path the mount shows at its mount point, and the mount point
    root: str
    mountpoint: str

    def directory_of(self, path: str) -> Path | None:
        """The directory of a cgroup named by its hierarchy path (None: not under the mount)."""
        prefix = self.root.rstrip("/")
        if path != self.root and not path.startswith(prefix + "/"):
            return None
        return Path(self.mountpoint, path[len(prefix) :].lstrip("/"))


def find_cgroup() -> tuple[CgroupHome | None, str]:
    """This process's cgroup v2 home if its cgroup is writable, or None and why not."""
    own = cgroup_of("self")
    if own is None:
        return None, "this process is in no cgroup v2 hierarchy (/proc/self/cgroup)"
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return None, f"cannot read /proc/self/mountinfo: {exc.strerror}"
    mounts = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            mounts.append((_unescape(fields[3]), _unescape(fields[4])))
    if not mounts:
        return None, "cgroup v2 is not mounted"
    for root, point in mounts:
        home = CgroupHome(Path(point), own, root, point)
        directory = home.directory_of(own)
        if directory is None or not (directory / "cgroup.procs").is_file():
            continue
        if not os.access(directory, os.W_OK):
            return None, f"{directory} (this process's cgroup) is not writable"
        return home._replace(directory=directory), ""
    return None, f"this process's cgroup {own} is not under a cgroup v2 mount"


def _read_pids(path: Path | str) -> list[int]:
    """The pids a ``cgroup.procs`` lists ([] if it cannot be read). os.read,
    not ``Path.read_text``: a third of its time, and ``hsu status`` reads one
    per instance (docs/benchmarks.md, "Footprint")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        finally:
            os.close(fd)
        return [int(p) for p in data.split()]
    except (OSError, ValueError):
        return []


def _populated(cgroup: Path) -> bool:
    try:
        for line in (cgroup / "cgroup.events").read_text().splitlines():
            if line.startswith("populated "):
                return line.split()[1] != "0"
    except OSError:
        return False
    return bool(_read_pids(cgroup / "cgroup.procs"))


def _kill_pid(pid: int, entry: bytes) -> int | None:
    """SIGKILL ``pid`` if its environment holds ``entry`` once a pidfd pins the
    process (so a reused pid is never signalled); returns the pidfd (the
    caller closes it), or None if it was not killed."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        if _environ_has(pid, entry):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


async def _until_dead(pidfds: list[int], timeout: float) -> None:
    """Wait (bounded) until every pidfd's process has exited, then close them."""
    poll = select.poll()
    for fd in pidfds:
        poll.register(fd, select.POLLIN)
    left = set(pidfds)
    deadline = time.monotonic() + timeout
    delay = 0.001
    try:
        while left and time.monotonic() < deadline:
            left -= {fd for fd, _ in poll.poll(0)}
            if left:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
    finally:
        for fd in pidfds:
            os.close(fd)


# -- per kernel --------------------------------------------------------------------


class Containment:
    """A kernel's containment of its instances' processes (see the module)."""

    def __init__(self, leaders: Callable[[], Collection[int]]):
        """``leaders``: the pids of the instances' main processes now, which
        are reaped by their handles, never here."""
        self._leaders = leaders
        self.mode: Mode = "none"
        #: where instance cgroups are made (cgroup mode)
        self.base: Path | None = None
        self._home: CgroupHome | None = None
        #: instance id -> its cgroup: directory and path in the hierarchy
        self._cgroups: dict[str, tuple[Path, str]] = {}
        #: (pid, start time) of processes ended here, reaped here once they are
        #: our zombies
        self._ended: set[tuple[int, int]] = set()
        self._me = os.getpid()
        self._sid = os.getsid(0)
        self._subreaper = False
        self._acquired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sigchld = False
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.TimerHandle | None = None

    # -- lifecycle

    def start(self) -> None:
        """Become a child subreaper, pick cgroups or not, start reaping (in
        the kernel's event loop)."""
        if self._loop is not None:
            return
        want, why = self._begin()
        if why is None:
            why = self._setup_cgroups()
        self._choose(want, why)

    async def start_async(self) -> None:
        """:meth:`start`, with the cgroup check (mkdir, and a process that
        joins the cgroup, waited for) on a thread of its own, which ends with
        it: the loop goes on meanwhile (the kernel starts its servers)."""
        if self._loop is not None:
            return
        want, why = self._begin()
        if why is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="hsu-cgroup-check")
            try:
                loop = asyncio.get_running_loop()
                why = await loop.run_in_executor(pool, self._setup_cgroups)
            finally:
                pool.shutdown(wait=False)
        self._choose(want, why)

    def _begin(self) -> tuple[str, str | None]:
        """The subreaper and what ``HSU_CONTAINMENT`` asks for; why there are
        no cgroups, or None: they are to be set up."""
        self._me, self._sid = os.getpid(), os.getsid(0)
        if not self._acquired:
            self._subreaper, self._acquired = _acquire_subreaper(), True
        want = os.environ.get(ENV_CONTAINMENT, "auto") or "auto"
        if want not in ("auto", "cgroup", "subreaper"):
            logger.warning(
                "{}={!r}: not auto, cgroup or subreaper; using auto", ENV_CONTAINMENT, want
            )
            want = "auto"
        if want != "subreaper" and self.base is None:
            return want, None
        return want, f"{ENV_CONTAINMENT}=subreaper"

    def _choose(self, want: str, why: str) -> None:
        if self.base is not None:
            self.mode = "cgroup"
            logger.info(
                "containment: a cgroup v2 per instance under {}{}",
                self.base,
                "" if self._subreaper else "; not a child subreaper (prctl failed)",
            )
        elif self._subreaper:
            self.mode = "subreaper"
            say = logger.warning if want == "cgroup" else logger.info
            say(
                "containment: no cgroups ({}); as the child subreaper, the kernel ends"
                " the processes that left an instance's group by {} when it stops",
                why,
                ENV_INSTANCE_ID,
            )
        else:
            self.mode = "none"
            logger.warning(
                "containment: none (no cgroups: {}; PR_SET_CHILD_SUBREAPER failed):"
                " processes that leave an instance's process group outlive it",
                why,
            )
        self._start_reaping()

    def close(self) -> None:
        """Stop reaping (after a last reap) and remove what this kernel created."""
        loop, self._loop = self._loop, None
        for timer in (self._timer, self._soon):
            if timer is not None:
                timer.cancel()
        self._timer = self._soon = None
        if self._sigchld and loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGCHLD)
        self._sigchld = False
        if loop is not None:
            self.sweep()
        for leaf, _ in self._cgroups.values():
            with contextlib.suppress(OSError):
                leaf.rmdir()
        self._cgroups.clear()
        if self.base is not None:
            with contextlib.suppress(OSError):
                self.base.rmdir()  # busy while another kernel of this process uses it
        if self._acquired:
            _release_subreaper()
            self._subreaper = self._acquired = False

    def _setup_cgroups(self) -> str:
        """Make the base cgroup and check a process can join a cgroup in it;
        sets :attr:`base`, or returns why not."""
        home, why = find_cgroup()
        if home is None:
            return why
        self._remove_stale(home.directory)
        me = _stat(os.getpid())
        # its pid alone would not do: a kernel in a pid namespace is pid 1
        base = home.directory / f"hsu-{os.getpid()}-{me.start if me else 0}"
        probe = base / f"probe-{id(self):x}"
        try:
            base.mkdir(exist_ok=True)
            probe.mkdir()
        except OSError as exc:
            return f"cannot create {probe}: {exc.strerror}"
        try:
            # the very wrapper an instance is started with; with no command
            # to exec after it joins, it exits 0 (one exec, not two)
            done = subprocess.run(
                cgroup_argv(str(probe)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=10,
                check=False,
            )
            if done.returncode != 0:
                return f"a process cannot join {probe}: {done.stderr.decode().strip()}"
        except (OSError, subprocess.SubprocessError) as exc:
            return f"a process cannot join {probe}: {exc}"
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()
        self.base, self._home = base, home
        return ""

    @staticmethod
    def _remove_stale(own_dir: Path) -> None:
        """The empty cgroups of kernels that are gone (a populated one holds
        instances a next kernel may re-attach to, and stays). Only those a
        minute old: a kernel in another pid namespace may share this cgroup,
        and has just made the one it is starting a process into."""
        now = time.time()
        with contextlib.suppress(OSError):
            for old in own_dir.glob("hsu-*-*"):
                pid, _, start = old.name[4:].partition("-")
                if not (pid.isdigit() and start.isdigit()):
                    continue
                st = _stat(int(pid))
                if st is not None and st.start == int(start):
                    continue  # its kernel runs
                for leaf in old.iterdir():
                    with contextlib.suppress(OSError):
                        if leaf.is_dir() and now - leaf.stat().st_mtime > STALE_AGE:
                            leaf.rmdir()
                with contextlib.suppress(OSError):
                    old.rmdir()

    # -- instances

    def cgroup_for(self, instance_id: str) -> str | None:
        """The cgroup a new process of the instance joins (created now), or
        None without cgroups."""
        leaf = self.reserve(instance_id)
        if leaf is None:
            return None
        problem = self.make(leaf)
        if problem:
            self.unreserve(instance_id, problem)
            return None
        return leaf

    def reserve(self, instance_id: str) -> str | None:
        """The cgroup a new process of the instance joins, recorded as the
        instance's (so it is removed when the instance ends or the kernel
        stops) but not created: :meth:`make` does that, on any thread; None
        without cgroups."""
        if self.base is None or self._home is None:
            return None
        leaf = os.path.join(self.base, instance_id)
        path = "/".join((self._home.path.rstrip("/"), self.base.name, instance_id))
        self._cgroups[instance_id] = (Path(leaf), path)
        return leaf

    def make(self, leaf: str) -> str:
        """Create a cgroup :meth:`reserve` named (the base again, if another
        kernel here removed it); returns why it could not ("" if it did).
        Touches nothing of this object but the file system: safe on a thread."""
        problem = ""
        for _ in range(2):
            try:
                os.mkdir(leaf)
                return ""
            except FileExistsError:
                return ""
            except FileNotFoundError as exc:
                # another kernel here may have removed the base
                problem = exc.strerror or str(exc)
                with contextlib.suppress(FileExistsError, FileNotFoundError):
                    os.mkdir(os.path.dirname(leaf))
            except OSError as exc:
                return exc.strerror or str(exc)
        return problem

    def unreserve(self, instance_id: str, problem: str) -> None:
        """The cgroup :meth:`reserve` named could not be made (``problem``):
        the instance's processes are found by their environment instead."""
        found = self._cgroups.pop(instance_id, None)
        logger.bind(instance=instance_id).warning(
            "cannot create the cgroup {}: {}; its processes are found by {} instead",
            found[0] if found else instance_id,
            problem,
            ENV_INSTANCE_ID,
        )

    def adopt(self, instance_id: str, pid: int) -> None:
        """A re-attached instance: the cgroup its process is in, if a kernel
        made it for this instance (its last path part is the instance id)."""
        if self._home is None:
            return
        path = cgroup_of(pid)
        if path is None or path.rsplit("/", 1)[-1] != instance_id:
            return
        leaf = self._home.directory_of(path)
        if leaf is not None and (leaf / "cgroup.procs").is_file():
            self._cgroups[instance_id] = (leaf, path)

    def members(self, instance_id: str) -> list[int] | None:
        """The pids in the instance's cgroup (None without one)."""
        found = self._cgroups.get(instance_id)
        return None if found is None else _read_pids(f"{found[0]}/cgroup.procs")

    async def end(self, instance_id: str, leader: int) -> list[int]:
        """Kill what is left of the instance's processes once ``leader`` (its
        main process; 0 if none started) is gone and its group was signalled.
        Returns the pids found left (outside the leader's group)."""
        found = self._cgroups.pop(instance_id, None)
        if found is not None:
            left = await self._end_cgroup(found[0], leader)
        elif leader and self.mode != "none":
            left = await self._end_by_environment(instance_id)
        else:
            left = []
        if self._loop is not None:
            self.sweep()
        return left

    async def _end_cgroup(self, leaf: Path, leader: int) -> list[int]:
        pids = _read_pids(leaf / "cgroup.procs")
        left = []
        for pid in pids:
            st = _stat(pid)
            if st is not None:
                self._ended.add((pid, st.start))
                if st.pgid != leader:
                    left.append(pid)
        kill = leaf / "cgroup.kill"
        deadline = time.monotonic() + EMPTY_TIMEOUT
        delay = 0.002
        while pids and _populated(leaf) and time.monotonic() < deadline:
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            else:  # before Linux 5.14: each pid, again until none is left
                for pid in _read_pids(leaf / "cgroup.procs"):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        _remove_cgroup(leaf)
        if leaf.parent != self.base:
            # a re-attached instance's, made by a kernel that is gone: its
            # base goes with its last instance
            with contextlib.suppress(OSError):
                leaf.parent.rmdir()
        return left

    async def _end_by_environment(self, instance_id: str) -> list[int]:
        entry = f"{ENV_INSTANCE_ID}={instance_id}".encode()
        left: list[int] = []
        for _ in range(5):  # a round may miss what forked during the last one
            pidfds = []
            for pid in _pids():
                fd = _kill_pid(pid, entry) if pid != self._me else None
                if fd is None:
                    continue
                pidfds.append(fd)
                if (st := _stat(pid)) is not None:
                    self._ended.add((pid, st.start))  # to reap if it is ours
                if pid not in left:
                    left.append(pid)
            if not pidfds:
                break
            await _until_dead(pidfds, EMPTY_TIMEOUT)
        return left

    # -- reaping

    def _start_reaping(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(
            signal.SIGCHLD
        ) in (signal.SIG_DFL, None):
            try:
                loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
                self._sigchld = True
            except (ValueError, RuntimeError, NotImplementedError):
                self._sigchld = False
            else:
                _quiet_wakeup_fd(loop)
        if not self._sigchld:
            self._timer = loop.call_later(REAP_INTERVAL, self._tick)
        self.sweep()

    def _on_sigchld(self) -> None:
        # a burst of exits is one reap
        if self._soon is None and self._loop is not None:
            self._soon = self._loop.call_later(0.01, self._sweep_soon)

    def _sweep_soon(self) -> None:
        self._soon = None
        self.sweep()

    def _tick(self) -> None:
        self.sweep()
        if self._loop is not None:
            self._timer = self._loop.call_later(REAP_INTERVAL, self._tick)

    def sweep(self) -> int:
        """Reap the zombie children that are ours to reap; returns how many were."""
        reaped = 0
        leaders = set(self._leaders())
        while True:  # the common case, no zombie at all, is one syscall
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                self._forget_ended()
                return reaped
            if not self._reapable(info.si_pid, leaders) or not _reap(info.si_pid):
                break
            reaped += 1
        # the first zombie is someone else's to reap: look at every one
        for pid in _pids():
            st = _stat(pid)
            if (
                st is not None
                and st.ppid == self._me
                and self._reapable(pid, leaders, st)
                and _reap(pid)
            ):
                reaped += 1
        self._forget_ended()
        return reaped

    def _reapable(self, pid: int, leaders: set[int], st: _Stat | None = None) -> bool:
        st = st or _stat(pid)
        if st is None or st.state != "Z" or st.ppid != self._me or pid in leaders:
            return False
        if st.sid not in (self._sid, pid):
            return True  # in a session the kernel did not make: the kernel did not fork it
        if (pid, st.start) in self._ended:
            return True
        if self._cgroups:
            path = cgroup_of(pid)
            return path is not None and any(path == p for _, p in self._cgroups.values())
        return False

    def _forget_ended(self) -> None:
        if self._ended:
            self._ended = {
                (pid, start)
                for pid, start in self._ended
                if (st := _stat(pid)) is not None and st.start == start
            }


def _remove_cgroup(leaf: Path) -> None:
    try:
        leaf.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove the cgroup {}: {}", leaf, exc.strerror)


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid
