"""The files an HSU writes its stdout and stderr into, followed by the kernel.

An HSU is spawned with both streams redirected straight into files rather than
pipes, so it outlives a kernel that is SIGKILLed and is re-attached to when the
kernel restarts. One reader follows every file, woken by Linux inotify when a
file is written to (periodic polling where inotify is unavailable): each line
goes to the kernel's log (bound to unit, instance, pid and stream) and into a
per-instance tail, and each file is rotated by size.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import functools
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from loguru import logger

from hsu._kernel.control import secure_dir
from hsu.errors import HsuError

if TYPE_CHECKING:
    from loguru import Logger

STREAMS = ("stdout", "stderr")
CHUNK = 64 * 1024  # one read
LONG_LINE = 64 * 1024  # a longer line is logged in pieces of this size
LINE_BUDGET = 1000  # lines logged from one file per tick
CATCH_UP_LINES = 5000  # lines logged at once when catching up at a rotation or drain
TICK_BUDGET = 2**20  # bytes read from one file per tick; the rest waits for the next tick
CATCH_UP = 2**20  # unread bytes looked at when catching up; older ones are skipped
COPY_CHUNK = 2**20
ROTATE_SLACK = 64 * 1024  # a file this far over max_bytes (at most a 1/4 of it) is copied whole
ROTATE_GAP = 0.002  # the rotation thread looks at the files at most this often
BUSY_RETRY = 0.002  # a file the rotation thread held when the reader came: read again then

Tail = collections.deque[tuple[str, str]]


def _as_is(line: str) -> str:
    return line


class _Stop(Exception):
    """The file cannot be followed any more."""


@attrs.frozen
class _Rotated:
    """A rotation not read yet: where the rotated bytes end (absolute: bytes
    since the file was followed), and the last of them the follower had not
    read (``blob``, from ``start`` on), kept in memory for it."""

    start: int
    blob: bytes
    end: int
    kept: str  # the copy, "" without backups

    def unread(self, pos: int) -> tuple[int, bytes]:
        """(bytes skipped, bytes to log) for a follower at ``pos``."""
        if pos <= self.start:
            return self.start - pos, self.blob
        return 0, self.blob[pos - self.start :]


@attrs.define(eq=False)
class _File:
    unit: str
    instance_id: str
    stream: str
    #: the path without ``.<stream>.log``: one string for both files of an
    #: instance (a Path would cost ~300 bytes more per file)
    stem: str
    #: (st_dev, st_ino) of the file followed: opened again by path, it must be this one
    ident: tuple[int, int]
    #: open only while the reader reads it (-1 between reads: no fd per idle file)
    fd: int
    offset: int
    pid: int
    #: the instance's tail, made at its first line (an empty deque costs ~600 bytes)
    tail: Tail | None
    #: an unfinished last line (bytes: the empty one is shared; an empty
    #: bytearray per file would cost 56 bytes)
    partial: bytes = b""
    wd: int | None = None  # its inotify watch; None: polled (or closed)
    #: its watch on the rotation thread's inotify fd (under ``_Rotator._lock``)
    rotator_wd: int | None = None
    closed: bool = False  # no longer followed
    # bound on first use: a logger bound per file costs ~600 bytes, and most
    # files of an idle instance never get a line
    _log: Logger | None = None
    # what is left of its budget until ``window_end`` (``time.monotonic()``)
    window_end: float = 0.0
    lines_left: int = 0
    bytes_left: int = 0
    timer: asyncio.TimerHandle | None = None  # set while it is behind: the next pass
    busy: bool = False  # the last read found the rotation thread holding it
    # Rotation, possibly on the rotation thread: it holds ``lock`` to rotate
    # (with an fd of its own), the reader to read the live file (``closed`` is
    # set under it too).
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    rotated: _Rotated | None = None  # the last rotation, until the reader takes it
    error: BaseException | None = None  # the rotation failed: stop following
    gen_start: int = 0  # rotation's: the live file's byte 0, absolute
    # the reader's: ``offset`` is in the live file, whose byte 0 is ``base``
    # (absolute); a taken rotation's unread bytes are read first (``backlog``,
    # whose byte 0 is ``backlog_at``, read up to ``backlog_pos``)
    base: int = 0
    backlog: bytes | None = None
    backlog_at: int = 0
    backlog_pos: int = 0

    @property
    def path(self) -> str:
        return f"{self.stem}.{self.stream}.log"


# -- inotify(7), just enough of it, through ctypes

IN_MODIFY = 0x00000002  # written to or truncated
IN_Q_OVERFLOW = 0x00004000  # events were dropped (wd -1)
IN_IGNORED = 0x00008000  # the watch is gone
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name[len]
_EVENTS_READ = 64 * 1024  # one read(2) of the inotify fd; ~4000 events without names


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.inotify_rm_watch.restype = ctypes.c_int
    return libc


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


class _Inotify:
    """One non-blocking, close-on-exec inotify fd and its ``IN_MODIFY`` watches.

    Raises ``OSError`` (``ENOSYS``, ``EMFILE``...) or ``AttributeError`` (no
    such function in the C library: not Linux) when inotify is unavailable."""

    def __init__(self) -> None:
        self._libc = _libc()
        # IN_NONBLOCK | IN_CLOEXEC: <sys/inotify.h> defines them as these
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _errno_error("inotify_init1")
        self.fd: int = fd

    def add_watch(self, fd: int, path: str) -> int:
        """Watch the file open at ``fd`` (through ``/proc/self/fd``: the very
        inode we read, even if ``path`` was replaced since), else at ``path``."""
        wd: int = -1
        if fd >= 0:
            wd = self._libc.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % fd, IN_MODIFY)
        if wd < 0 and (fd < 0 or ctypes.get_errno() in (errno.ENOENT, errno.EACCES)):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            raise _errno_error("inotify_add_watch")
        return wd

    def rm_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL: already gone, fine

    def read(self) -> list[tuple[int, int]]:
        """The queued events as (wd, mask); [] if there are none. Reads at most
        16 times: a reader called again for the rest is better than one that
        never returns while files are written to flat out."""
        events = []
        for _ in range(16):
            try:
                buf = os.read(self.fd, _EVENTS_READ)
            except BlockingIOError:
                break
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, pos)
                events.append((wd, mask))
                pos += _EVENT.size + size
            if len(buf) <= _EVENTS_READ - _EVENT.size - 256:  # room for one more: drained
                break
        return events

    def close(self) -> None:
        os.close(self.fd)


class _Rotator:
    """The thread that holds the followed files to their size, while
    ``LogFiles.run()`` runs.

    It has an inotify fd of its own (an ``IN_MODIFY`` watch per file) and
    blocks on it, so it costs nothing while no file is written to; woken, it
    ``fstat``-s each file written to and rotates those over ``max_bytes``
    (``LogFiles._enforce``), at most once every ``ROTATE_GAP`` seconds. The
    reader also hands it (``kick``) a file it found too big: that is how a
    file without a watch here gets rotated. The event loop never copies.
    """

    def __init__(self, files: LogFiles, loop: asyncio.AbstractEventLoop):
        self._files = files
        self._loop = loop
        self._lock = threading.Lock()  # guards the two below and each file's rotator_wd
        self._watches: dict[int, tuple[_File, ...]] = {}  # tuples: 40 bytes less than lists
        self._kicked: dict[_File, None] = {}
        self._stopping = False
        self._ino: _Inotify | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="hsu-log-rotation", daemon=True)
        try:
            if files._use_inotify:
                try:
                    self._ino = _Inotify()
                except (OSError, AttributeError) as exc:
                    files._say(str(exc), "rotating only the files found too big when read")
            self._thread.start()
        except BaseException:
            if self._ino is not None:
                self._ino.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    def add(self, f: _File) -> None:
        if self._ino is None:
            return
        try:
            wd = self._ino.add_watch(f.fd, f.path)
        except OSError as exc:
            self._files._say(str(exc), f"rotating {f.path} only when found too big when read")
            return
        with self._lock:
            self._watches[wd] = (*self._watches.get(wd, ()), f)
            f.rotator_wd = wd

    def remove(self, f: _File) -> None:
        with self._lock:
            self._kicked.pop(f, None)
            wd, f.rotator_wd = f.rotator_wd, None
            if wd is None:
                return
            files = tuple(g for g in self._watches.get(wd, ()) if g is not f)
            if files:
                self._watches[wd] = files
                return
            self._watches.pop(wd, None)
        if self._ino is not None:
            self._ino.rm_watch(wd)

    def kick(self, f: _File) -> None:
        """Have ``f`` looked at soon."""
        with self._lock:
            self._kicked[f] = None
        self._poke()

    def stop(self) -> None:
        """End the thread (after the rotation it may be doing) and close its fds."""
        self._stopping = True
        self._poke()
        self._thread.join()
        with self._lock:  # a later rotator's watches are its own
            for files in self._watches.values():
                for f in files:
                    f.rotator_wd = None
            self._watches.clear()
        if self._ino is not None:
            self._ino.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it will wake anyway
            os.write(self._wake_w, b"!")

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._ino is not None:
            poller.register(self._ino.fd, select.POLLIN)
        last = 0.0
        while True:
            ready = {fd for fd, _ in poller.poll()}
            wait = last + ROTATE_GAP - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # what is written meanwhile coalesces
            last = time.monotonic()
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            if self._stopping:  # after the read: stop() pokes after setting it
                return
            events: list[tuple[int, int]] = []
            if self._ino is not None:
                try:
                    events = self._ino.read()
                except OSError as exc:  # not seen: kicks only from now on
                    poller.unregister(self._ino.fd)
                    self._files._say(str(exc), "rotating only the files found too big when read")
            with self._lock:
                due = dict(self._kicked)
                self._kicked.clear()
                for wd, mask in events:
                    if mask & IN_Q_OVERFLOW:
                        for files in self._watches.values():
                            due.update(dict.fromkeys(files))
                    else:
                        due.update(dict.fromkeys(self._watches.get(wd, ())))
            for f in due:
                if self._files._enforce(f):
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        self._loop.call_soon_threadsafe(self._files._kick, [f])


class LogFiles:
    """Per-instance stdout/stderr files under one directory, followed by one task.

    Files live at ``<directory>/<unit>/<instance_id>.stdout.log`` (and
    ``.stderr.log``). The follower holds no fd of a file between reads: when
    a file was written to, it opens it by path (checking that it is still the
    file it followed: same device and inode), reads it with ``os.pread`` at its
    own offset, ``fstat``-s it, and closes it. An idle instance therefore costs
    the kernel no fd for its logs (its pidfd is the only one), so a kernel
    under the common soft limit of 1024 files is not limited to ~340 instances
    by three fds each. The open and close cost ~3 us a read, against ~300 us
    for the wake-up that comes before it. The price: a file deleted or replaced
    at its path is no longer read from then on (bytes its child writes into a
    deleted file are lost; an fd held open could still read them).

    How it knows a file grew: one inotify fd (created with the first followed
    file, closed with the last) holds an ``IN_MODIFY`` watch on each file, and
    ``run()`` has the event loop call it when events are queued. It reads every
    queued event, then each file they name once (a burst of writes to one file
    is one read). An idle kernel therefore does not wake up for its logs at
    all: no timer, no syscall, whatever the number of files (the poll loop this
    replaced woke up every 0.25 s and ``pread`` every file). Files written to
    all the time do not wake it once a write either: after handling events it
    stops listening if woken again within ``gap`` seconds, and handles what
    queued up (coalesced) at the end of the gap, and at the end of every next
    gap until one finds nothing new. So: one wake-up for a lone line, at most
    about one per ``gap`` for busy files, and a line waits at most ``gap``
    (0.25 s by default, as the poll loop's interval was).

    Measured on a shared 2-CPU VM, where one wake-up of the process costs
    ~0.3 ms of CPU (kernel scheduling included) and dominates: 100 followed
    idle files over 10 s cost 0.6-3.3 ms of CPU and 0-1 wake-ups (the poll
    loop: 41 wake-ups, 14 ms); a line a second, 11 wake-ups and 4.8-6.5 ms
    (poll loop: 43 and 17 ms); a line every 5 ms, 27-33 µs a line either way
    (``python bench/logfollower_idle.py``, and ``--module`` for the poll loop).
    The rotation thread (below) wakes up too, once per write or burst of
    writes (at most every 2 ms): with it, a line every 5 ms costs ~75 µs
    (~37 µs without, the same machine, same day), 10 lines a second apart 45
    wake-ups of all threads (11 without) and 5.6 ms (4.2); idle, nothing
    more (``voluntary_ctxt_switches`` of every ``/proc/self/task``). The work of one
    event, wake-up excluded (``read`` of the inotify fd, ``pread``,
    ``fstat``, the line logged to a no-op loguru sink, and the ``write``
    itself) is ~5-6 µs, measured with::

        python -c "
        import os, tempfile, timeit; from loguru import logger
        from hsu._kernel.supervision.logfiles import LogFiles
        logger.remove(); logger.add(lambda m: None, format='{message}')
        lf = LogFiles(tempfile.mkdtemp()); fds = []
        for i in range(50): fds += lf.open_for_child('u', str(i)); lf.follow('u', str(i), 1)
        def one(): os.write(fds[0], b'a line\\n'); lf._on_events()
        print(min(timeit.repeat(one, number=2000, repeat=7)) / 2000 * 1e6, 'us')"

    (The CPU figures: ``time.process_time()`` and ``voluntary_ctxt_switches``
    of ``/proc/self/status`` around an ``asyncio.sleep`` with ``run()``
    running, writes made by a child process.)

    Where inotify is unavailable (no inotify in the C library, ``ENOSYS``,
    too many inotify instances or watches, ``inotify=False``) the files that
    could not be watched are polled every ``interval`` seconds instead, as
    they all were before, and why is logged once at debug level. Events are
    those of the local kernel: a file on a network file system written to by
    another host is not seen to grow (the HSUs writing it are local here).

    Work is bounded per file and per ``interval`` (a tick; logging a line
    costs ~20-30 µs): at most ``LINE_BUDGET`` lines (and ``TICK_BUDGET``
    bytes) of a file are read in one tick. A file that has more waits, its
    events ignored, for one timer at the end of that tick; it has a timer until
    it has been caught up with. A child writing faster than that falls behind;
    when its file is then rotated, the last up to ``CATCH_UP`` bytes it had not
    read are kept in memory for it and read next, within the same budget, and
    it warns how many bytes it skipped (the newest of them are in the ``.1``
    copy). At a drain it catches up at once: it logs only the last
    ``CATCH_UP_LINES`` complete lines of the last ``CATCH_UP`` unread bytes.
    ``poll()`` is one tick for every file at once (fresh budgets), whether it
    has events or not.

    Rotation is copytruncate, because the child holds its fd with O_APPEND and
    cannot be told to reopen, and it is not the reader's job: while ``run()``
    runs, a thread (``_Rotator``) watches every file through an inotify fd of
    its own and rotates one as soon as it is bigger than ``max_bytes``, at most
    every ``ROTATE_GAP`` (2 ms), so the event loop never copies and a file
    written to at 100 MB/s is rotated within milliseconds, not at the next
    tick. The copy goes into the oldest backup, overwritten in place (freeing
    its blocks takes a file system transaction, slow on a busy disk), then the
    live file is truncated to 0, then the copies are renamed one older
    (``.N`` becomes ``.1``), no rename replacing a file. At most ``max_bytes``
    bytes are copied (from a line's start), or the whole file if it is within
    ``slack`` of the limit (``ROTATE_SLACK``, 64 KiB, or a quarter of
    ``max_bytes`` if less), the usual case of one write having crossed it: no
    backup is ever bigger than ``max_bytes + slack``. The
    live file can get bigger than ``max_bytes`` by what the child writes
    before the thread has rotated it: one write, plus the thread's reaction
    time (about 1-2 ms; tens of milliseconds, at worst ~150 ms, measured on a
    2-CPU VM loaded 5x) times the rate. The reader and the thread take turns
    on a file through ``_File.lock`` (the reader never waits: a file being
    rotated is read at the end of the tick). Known caveat of copytruncate:
    what the child writes between the start of the copy and the truncate is
    lost (the whole window is one ``copy_file_range`` and one ``ftruncate``).
    With ``backups=0`` no copy is kept: the unread bytes are read into memory
    and the file is truncated at once. A file truncated by someone else is not
    noticed until it is rotated. Without an event loop (``poll()`` called by
    hand) the reader rotates a file it finds too big itself.

    A file that cannot be opened, read or rotated (deleted, replaced, fd
    error) is logged once as a warning and no longer followed; the rest go on.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 10 * 2**20,
        backups: int = 3,
        interval: float = 0.25,
        tail_lines: int = 200,
        inotify: bool = True,
        gap: float = 0.25,
    ):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        #: applied to every line before it is logged or kept for a tail (the
        #: kernel hides the deployment's resolved secrets; the files keep all)
        self.redact: Callable[[str], str] = _as_is
        #: how far over max_bytes a file is still copied whole (one write crossed it)
        self.slack = min(ROTATE_SLACK, max_bytes // 4)
        self.backups = backups
        self.interval = interval
        self.tail_lines = tail_lines
        self._instances: dict[str, list[_File]] = {}
        self._files: list[_File] = []  # flat, for poll()
        self._tails: dict[str, Tail] = {}
        self._use_inotify = inotify
        self.gap = gap
        self._gap_timer: asyncio.TimerHandle | None = None  # while events are not listened to
        self._handled = float("-inf")  # when events were last handled (time.monotonic())
        self._inotify: _Inotify | None = None
        # wd -> its files (one, but for links); tuples: 40 bytes less than lists
        self._watches: dict[int, tuple[_File, ...]] = {}
        self._polled: list[_File] = []  # the files without a watch: the fallback
        self._poll_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # while run() runs
        self._rotator: _Rotator | None = None  # while run() runs
        self._said: set[str] = set()
        self._secured: set[str] = set()  # units whose directory secure_dir() checked
        self._root = str(self.directory)  # for the paths of a spawn's files, as strings

    def _stem(self, unit: str, instance_id: str) -> str:
        """The instance's files' path without ``.<stream>.log`` (a string:
        pathlib's joins cost more than the rest of a spawn's file work)."""
        return f"{self._root}/{unit}/{instance_id}"

    def paths(self, unit: str, instance_id: str) -> tuple[Path, Path]:
        d = self.directory / unit
        return d / f"{instance_id}.stdout.log", d / f"{instance_id}.stderr.log"

    def known(self, instance_id: str) -> bool:
        """Whether the instance's files are followed (so they exist: a
        restart's spawn has nothing to create)."""
        return instance_id in self._instances

    def _secure(self, unit: str) -> None:
        """The logs directory (once) and the unit's (once per unit): 0700 and ours."""
        if not self._secured:
            secure_dir(self.directory)
        secure_dir(self.directory / unit)
        self._secured.add(unit)

    def prepare(self, unit: str, instance_id: str) -> None:
        """Create the instance's two files (and the unit's directory) if they
        are not there yet, and close them again: what costs in
        :meth:`open_for_child` (a file's creation, a fraction of a millisecond
        on ext4) done ahead, off the event loop, on a thread of the spawn
        path. Safe to call from a thread; an error is left for
        :meth:`open_for_child` to raise, where it did before."""
        stem = self._stem(unit, instance_id)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        with contextlib.suppress(OSError, HsuError):
            if unit not in self._secured:
                self._secure(unit)
            for stream in STREAMS:
                os.close(os.open(f"{stem}.{stream}.log", flags, 0o600))

    def open_for_child(self, unit: str, instance_id: str) -> tuple[int, int]:
        """Create the unit's directory, open both files for appending and return
        their fds for ``Popen(stdout=, stderr=)``; the caller closes them after
        spawning."""
        stem = self._stem(unit, instance_id)
        out_path, err_path = f"{stem}.stdout.log", f"{stem}.stderr.log"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        # 0700 directories and 0600 files, whatever the umask; a directory is
        # checked at its first file (and again if it vanished since), not at
        # each of a thousand spawns
        if unit not in self._secured:
            self._secure(unit)
        try:
            out = os.open(out_path, flags, 0o600)
        except FileNotFoundError:
            self._secured.clear()
            self._secure(unit)
            out = os.open(out_path, flags, 0o600)
        try:
            err = os.open(err_path, flags, 0o600)
        except BaseException:
            os.close(out)
            raise
        return out, err

    def follow(
        self,
        unit: str,
        instance_id: str,
        pid: int,
        *,
        from_start: bool = False,
        fds: tuple[int, int] | None = None,
    ) -> None:
        """Start following both files of an instance: from offset 0
        (``from_start=True``), or from their current end, so old lines are not
        logged twice: when re-attaching to an instance that ran before a
        kernel restart, or before a spawn (then :meth:`set_pid` once the pid
        is known: every write of the new process comes after the watch, so
        nothing needs reading at once). ``fds``: the two files open already
        (what :meth:`open_for_child` returned, still open), which are watched
        through instead of opening each again; the caller closes them."""
        if instance_id in self._instances:
            self.unfollow(instance_id)
        tail = self._tails.get(instance_id)
        files = []
        stem = self._stem(unit, instance_id)
        for i, stream in enumerate(STREAMS):
            path = f"{stem}.{stream}.log"
            borrowed = fds is not None
            try:
                fd = (
                    fds[i]
                    if fds is not None
                    else os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                )
            except OSError as exc:
                logger.warning("not following {} of {}: {}", stream, instance_id, exc)
                continue
            try:
                st = os.fstat(fd)
            except OSError as exc:
                if not borrowed:
                    os.close(fd)
                logger.warning("not following {} of {}: {}", stream, instance_id, exc)
                continue
            ident = (st.st_dev, st.st_ino)
            f = _File(unit, instance_id, stream, stem, ident, fd, 0, pid, tail)
            self._watch(f)  # before its end is taken: any later write is an event
            try:
                f.offset = 0 if from_start else os.fstat(fd).st_size
            except OSError as exc:
                if borrowed:
                    f.fd = -1
                self._close(f)
                logger.warning("not following {} of {}: {}", stream, instance_id, exc)
                continue
            if self._rotator is not None:
                self._rotator.add(f)
            if borrowed:
                f.fd = -1  # the caller's to close: opened again by path when written to
            else:
                self._release(f)  # watched: opened again by path when written to
            files.append(f)
        self._instances[instance_id] = files
        self._files.extend(files)
        if self._loop is not None and files and from_start:
            # what was written before the watch: no event will say so
            self._loop.call_soon(self._kick, files)

    def set_pid(self, instance_id: str, pid: int) -> None:
        """The pid the instance's lines are logged with from now on (its
        files were followed before it was spawned)."""
        for f in self._instances.get(instance_id, ()):
            f.pid, f._log = pid, None

    def drain(self, instance_id: str) -> None:
        """Read what is left in the instance's files now, including a last line
        without a newline (call it once the process has exited). Far behind, it
        catches up: the last lines are the ones worth having."""
        for f in list(self._instances.get(instance_id, ())):
            try:
                with f.lock:  # blocking: a rotation under way ends in milliseconds
                    if f.error is not None:
                        raise f.error
                    rotated, f.rotated = f.rotated, None
                    pos = self._position(f)
                    if rotated is not None:
                        f.base, f.offset = rotated.end, 0
                    fd = self._open(f)
                    size = os.fstat(fd).st_size
                    start = max(f.offset, size - CATCH_UP)
                    skipped = start - f.offset
                    blob = _read(fd, start, size)
                    f.offset = start + len(blob)
                if rotated is not None:
                    self._take(f, rotated, pos)
                if f.backlog is not None:
                    rest = f.backlog[f.backlog_pos :]
                    if skipped:  # the live file alone has more than is worth logging
                        skipped += len(rest)
                        f.partial = b""
                    else:
                        self._catch_up(f, rest, 0, "")
                    self._end_backlog(f)
                self._catch_up(f, blob, skipped, str(f.path))
                self._check(f)
            except (OSError, _Stop) as exc:
                self._stop(f, exc)
                continue
            finally:
                self._release(f)
            self._flush(f)

    def unfollow(self, instance_id: str) -> None:
        """Drain the instance's files, then stop following them. Its tail is kept."""
        self.drain(instance_id)
        for f in self._instances.pop(instance_id, ()):
            self._close(f)

    def forget(self, instance_id: str) -> None:
        """Stop following the instance's files without reading them, and drop its tail."""
        for f in self._instances.pop(instance_id, ()):
            self._close(f)
        self._tails.pop(instance_id, None)

    def close(self) -> None:
        """Stop following every file (without reading them); tails are kept."""
        for instance_id in list(self._instances):
            for f in self._instances.pop(instance_id):
                self._close(f)
        self._close_inotify()
        if self._rotator is not None:
            self._rotator.stop()
            self._rotator = None

    def tail(
        self, instance_id: str, n: int | None = None, stream: str | None = None
    ) -> list[tuple[str, str]]:
        """The instance's last lines as (stream, line), oldest first."""
        lines = list(self._tails.get(instance_id, ()))
        if stream is not None:
            lines = [entry for entry in lines if entry[0] == stream]
        if n is not None:
            lines = lines[-n:] if n > 0 else []
        return lines

    def poll(self) -> None:
        """One tick for every followed file: read its new bytes within a fresh budget."""
        now = time.monotonic()
        failed: list[tuple[_File, Exception]] = []
        for f in self._files:
            try:
                self._pass(f, now, fresh=True)
            except (OSError, _Stop) as exc:
                failed.append((f, exc))
        for f, error in failed:
            self._stop(f, error)

    async def run(self) -> None:
        """Follow the files until cancelled: read each one when inotify says it
        was written to, poll the ones without a watch every ``interval``."""
        if self._loop is not None:
            raise RuntimeError("LogFiles.run() is already running")
        self._loop = asyncio.get_running_loop()
        try:
            self._rotator = _Rotator(self, self._loop)
        except (OSError, RuntimeError) as exc:  # no fd or thread left: the reader rotates
            logger.warning("log files: rotating on the event loop: no rotation thread: {}", exc)
        else:
            for f in self._files:
                self._rotator.add(f)
        try:
            if self._inotify is not None:
                self._add_reader(self._inotify)
            self.poll()  # what was written before: no event will say so
            self._arm_poll()
            await self._loop.create_future()  # until cancelled
        finally:
            if self._inotify is not None:
                self._loop.remove_reader(self._inotify.fd)
            for timer in (self._poll_timer, self._gap_timer):
                if timer is not None:
                    timer.cancel()
            self._poll_timer = self._gap_timer = None
            for f in self._files:
                if f.timer is not None:
                    f.timer.cancel()
                    f.timer = None
            self._loop = None
            if self._rotator is not None:
                self._rotator.stop()
                self._rotator = None

    # -- waking up

    def _pass(self, f: _File, now: float, *, fresh: bool = False) -> None:
        """Read ``f``'s new bytes within what is left of its budget for the tick
        (``fresh``: a new tick starts now); if some may be left, come back when
        the tick ends (a watched file; a polled one is read at the next poll)."""
        if fresh or now >= f.window_end:
            f.window_end = now + self.interval
            f.lines_left, f.bytes_left = LINE_BUDGET, TICK_BUDGET
        more = f.lines_left <= 0 or f.bytes_left <= 0
        if not more:
            try:
                more = self._advance(f)
            finally:
                self._release(f)
        if more and f.wd is not None and f.timer is None and self._loop is not None:
            if f.busy:  # turned away by a rotation (or its fstat): soon, not at the tick's end
                f.busy = False
                f.timer = self._loop.call_later(BUSY_RETRY, self._retry, f)
            else:
                f.timer = self._loop.call_later(max(0.0, f.window_end - now), self._resume, f)

    def _try_pass(self, f: _File, now: float, *, fresh: bool = False) -> None:
        try:
            self._pass(f, now, fresh=fresh)
        except (OSError, _Stop) as exc:
            self._stop(f, exc)

    def _on_readable(self) -> None:
        """The inotify fd has events. Handle them now, unless the last ones were
        less than a gap ago: then stop listening until that gap ends."""
        ino, loop = self._inotify, self._loop
        if ino is None or loop is None:
            return
        now = time.monotonic()
        wait = self._handled + self.gap - now
        if wait > 0:
            # the events meanwhile queue up, and coalesce, for _end_gap()
            loop.remove_reader(ino.fd)
            self._gap_timer = loop.call_later(wait, self._end_gap)
            return
        self._handled = now
        self._on_events()

    def _end_gap(self) -> None:
        """Handle the events queued during a gap; listen again once there are none."""
        self._gap_timer = None
        ino, loop = self._inotify, self._loop
        if ino is None or loop is None:
            return
        self._handled = time.monotonic()
        found = True
        try:
            found = self._on_events()
        finally:  # whatever happened, not deaf for good
            if self._inotify is ino:  # else closed (no file left) or abandoned meanwhile
                if found:  # still busy: another gap
                    self._gap_timer = loop.call_later(self.gap, self._end_gap)
                else:
                    self._add_reader(ino)

    def _on_events(self) -> bool:
        """Read the files the queued events name, each once; False if there were none."""
        ino = self._inotify
        if ino is None:
            return False
        try:
            events = ino.read()
        except OSError as exc:
            self._abandon_inotify(f"reading inotify events: {exc}")
            return False
        changed: dict[_File, None] = {}  # ordered, each file once
        for wd, mask in events:
            if mask & IN_Q_OVERFLOW:  # some were dropped: any file may have grown
                for files in self._watches.values():
                    changed.update(dict.fromkeys(files))
            elif mask & IN_IGNORED:  # not ours (ours are gone from _watches): file system
                for f in self._watches.pop(wd, ()):
                    f.wd = None
                    self._fall_back(f, "its inotify watch was removed by the system")
            else:
                changed.update(dict.fromkeys(self._watches.get(wd, ())))
        now = time.monotonic()
        for f in changed:
            if f.wd is not None and f.timer is None:  # behind: its timer will read it
                self._try_pass(f, now)
        if not self._watches:
            self._close_inotify()
        return bool(events)

    def _retry(self, f: _File) -> None:
        """The rotation thread held ``f`` at the last read: read it now, within
        the tick's budget (the event that woke the reader said it has bytes)."""
        f.timer = None
        self._try_pass(f, time.monotonic())

    def _resume(self, f: _File) -> None:
        """The tick ``f`` had used up its budget in has ended."""
        f.timer = None
        self._try_pass(f, time.monotonic(), fresh=True)

    def _kick(self, files: list[_File]) -> None:
        now = time.monotonic()
        for f in files:
            if not f.closed and f.timer is None:
                self._try_pass(f, now)

    def _on_poll(self) -> None:
        """The fallback: a tick for every file without a watch."""
        self._poll_timer = None
        now = time.monotonic()
        for f in list(self._polled):
            self._try_pass(f, now, fresh=True)
        self._arm_poll()

    def _arm_poll(self) -> None:
        if self._polled and self._poll_timer is None and self._loop is not None:
            self._poll_timer = self._loop.call_later(self.interval, self._on_poll)

    # -- watches

    def _watch(self, f: _File) -> None:
        ino = self._get_inotify()
        if ino is None:
            self._fall_back(f, None)
            return
        try:
            f.wd = ino.add_watch(f.fd, f.path)
        except OSError as exc:  # ENOSPC: fs.inotify.max_user_watches reached
            if not self._watches:
                self._close_inotify()
            self._fall_back(f, str(exc))
            return
        self._watches[f.wd] = (*self._watches.get(f.wd, ()), f)

    def _unwatch(self, f: _File) -> None:
        if f.timer is not None:
            f.timer.cancel()
            f.timer = None
        if f in self._polled:
            self._polled.remove(f)
            if not self._polled and self._poll_timer is not None:
                self._poll_timer.cancel()
                self._poll_timer = None
        if f.wd is None:
            return
        wd, f.wd = f.wd, None
        files = tuple(g for g in self._watches.get(wd, ()) if g is not f)
        if files:
            self._watches[wd] = files
        else:
            self._watches.pop(wd, None)
            if self._inotify is not None:
                self._inotify.rm_watch(wd)
                if not self._watches:
                    self._close_inotify()

    def _fall_back(self, f: _File, reason: str | None) -> None:
        """Poll ``f``: it could not be watched, for ``reason`` (None: said already)."""
        if reason is not None:
            self._say(reason, f"polling {f.path} (and any other file that fails so)")
        self._polled.append(f)
        self._arm_poll()

    def _get_inotify(self) -> _Inotify | None:
        """The inotify fd, created if need be; None if inotify cannot be had."""
        if self._inotify is None and self._use_inotify:
            try:
                self._inotify = _Inotify()
            except (OSError, AttributeError) as exc:
                transient = isinstance(exc, OSError) and exc.errno in (
                    errno.EMFILE,  # fs.inotify.max_user_instances reached
                    errno.ENFILE,
                    errno.ENOMEM,
                )
                self._use_inotify = transient  # else never again: retry next follow()
                self._say(str(exc), "inotify unavailable, polling the files")
                return None
            if self._loop is not None:
                self._add_reader(self._inotify)
        return self._inotify

    def _add_reader(self, ino: _Inotify) -> None:
        assert self._loop is not None
        try:
            self._loop.add_reader(ino.fd, self._on_readable)
        except NotImplementedError:  # an event loop without add_reader()
            self._abandon_inotify("the event loop cannot watch an fd")

    def _close_inotify(self) -> None:
        ino, self._inotify = self._inotify, None
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        if ino is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(ino.fd)
        with contextlib.suppress(OSError):
            ino.close()

    def _abandon_inotify(self, reason: str) -> None:
        """Poll every file from now on."""
        self._use_inotify = False
        self._say(reason, "inotify abandoned, polling the files")
        watched = [f for files in self._watches.values() for f in files]
        self._watches.clear()
        self._close_inotify()
        for f in watched:
            f.wd = None
            self._fall_back(f, None)

    def _say(self, reason: str, what: str) -> None:
        """Log at debug level why files are polled, once for each reason."""
        if reason not in self._said:
            self._said.add(reason)
            logger.debug("log files: {} every {} s: {}", what, self.interval, reason)

    # -- reading

    def _advance(self, f: _File) -> bool:
        """Log what ``f`` has new (the backlog of a rotation first) within what
        is left of its budget; then look at the file (too big: rotated). Return
        whether bytes may be left to read."""
        more = True
        while f.lines_left > 0 and f.bytes_left > 0:
            if f.backlog is not None:
                data = f.backlog[f.backlog_pos : f.backlog_pos + CHUNK]
                f.backlog_pos += self._consume(f, data)
                if f.backlog_pos >= len(f.backlog):
                    self._end_backlog(f)
                continue
            got = self._read_live(f)
            if got is None:  # the rotation thread has it: come back later
                break
            if f.backlog is not None:  # a rotation was taken: its bytes first
                continue
            used = self._consume(f, got)
            f.offset += used
            if used == len(got) and len(got) < CHUNK:
                more = False
                break
        self._check(f)
        return more

    def _consume(self, f: _File, data: bytes) -> int:
        """Log the lines of ``data`` within the budget; the bytes used."""
        used, emitted = self._feed(f, data, f.lines_left)
        f.bytes_left -= used
        f.lines_left -= emitted
        return used

    def _read_live(self, f: _File) -> bytes | None:
        """The next bytes of the live file; None while the rotation thread holds
        it. A rotation since the last read is taken first instead (b"": its
        unread bytes are now ``f.backlog``, possibly empty)."""
        if not f.lock.acquire(blocking=False):
            f.busy = True
            return None
        try:
            if f.error is not None:
                raise f.error
            rotated = f.rotated
            if rotated is None:
                return os.pread(self._open(f), CHUNK, f.offset)
            f.rotated = None
            pos = self._position(f)
            f.base, f.offset = rotated.end, 0
        finally:
            f.lock.release()
        self._take(f, rotated, pos)
        return b""

    def _position(self, f: _File) -> int:
        """Where the reader of ``f`` is, in bytes since it was followed."""
        if f.backlog is not None:
            return f.backlog_at + f.backlog_pos
        return f.base + f.offset

    def _take(self, f: _File, rotated: _Rotated, pos: int) -> None:
        """Read the bytes ``rotated`` kept for a reader at ``pos`` next."""
        skipped, blob = rotated.unread(pos)
        if skipped:
            f.partial = b""  # the rest of its line was skipped
            logger.warning(
                "{} of {}: {} bytes skipped, written faster than they can be logged ({})",
                f.stream,
                f.instance_id,
                skipped,
                f"{rotated.kept} and older copies keep the last ones"
                if rotated.kept
                else "not kept",
            )
        # even empty: ending it drops a line the rotation cut
        f.backlog, f.backlog_at, f.backlog_pos = blob, rotated.end - len(blob), 0

    def _end_backlog(self, f: _File) -> None:
        f.backlog, f.backlog_at, f.backlog_pos = None, 0, 0
        self._drop_cut_line(f)  # the rotated bytes ended there

    def _check(self, f: _File) -> None:
        st = os.fstat(self._open(f))
        if st.st_nlink == 0:
            raise _Stop(f"{f.path} was deleted")
        if st.st_size > self.max_bytes:
            if self._rotator is not None:
                self._rotator.kick(f)
            else:  # no event loop: no thread either
                with f.lock:
                    self._rotate(f)

    def _feed(self, f: _File, data: bytes, limit: int | None = None) -> tuple[int, int]:
        """Log the lines ``data`` completes (the first one after ``f.partial``),
        at most ``limit`` of them, and keep an unfinished last line in
        ``f.partial``. Return the bytes used (all of them unless ``limit`` lines
        were logged first: the rest is to be read again) and the lines logged."""
        start = emitted = 0
        while (nl := data.find(b"\n", start)) >= 0:
            if f.partial:
                line, f.partial = f.partial + data[start:nl], b""
                self._emit(f, line)
            else:
                self._emit(f, data[start:nl])
            start = nl + 1
            emitted += 1
            if limit is not None and emitted >= limit:
                return start, emitted
        if start < len(data):
            buf = f.partial + data[start:]
            while len(buf) > LONG_LINE:
                cut = _cut(buf, LONG_LINE)
                self._emit(f, buf[:cut])
                buf = buf[cut:]
            f.partial = buf
        return len(data), emitted

    def _catch_up(self, f: _File, blob: bytes, skipped: int, kept: str) -> None:
        """Log the last unread bytes of a file, ``blob``, after ``skipped`` bytes
        that were not even read: only its last ``CATCH_UP_LINES`` lines, starting
        on a line boundary."""
        start = 0
        if skipped and (nl := blob.find(b"\n")) >= 0:
            start = nl + 1  # blob starts within a line
        pos = len(blob)
        for _ in range(CATCH_UP_LINES + 1):
            pos = blob.rfind(b"\n", start, pos)
            if pos < 0:
                break
        else:
            start = pos + 1
        skipped += start
        if skipped:
            f.partial = b""  # the rest of its line was skipped
            logger.warning(
                "{} of {}: {} bytes skipped, written faster than they can be logged ({})",
                f.stream,
                f.instance_id,
                skipped,
                f"they are in {kept}" if kept else "not kept",
            )
        self._feed(f, blob[start:])

    def _flush(self, f: _File) -> None:
        if f.partial:
            line, f.partial = f.partial, b""
            self._emit(f, line)

    def _emit(self, f: _File, raw: bytes | bytearray) -> None:
        while len(raw) > LONG_LINE:
            cut = _cut(raw, LONG_LINE)
            self._emit(f, raw[:cut])
            raw = raw[cut:]
        line = self.redact(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if f.tail is None:
            f.tail = self._tails.get(f.instance_id)
            if f.tail is None:
                f.tail = self._tails[f.instance_id] = collections.deque(maxlen=self.tail_lines)
        f.tail.append((f.stream, line))
        if f._log is None:
            f._log = logger.bind(unit=f.unit, instance=f.instance_id, pid=f.pid, stream=f.stream)
        f._log.info("{}", line)

    # -- rotation

    def _enforce(self, f: _File) -> bool:
        """On the rotation thread: rotate ``f`` if it is too big. True if that
        failed: the reader is to stop following it (``f.error``)."""
        with f.lock:
            if f.closed or f.error is not None:
                return False
            try:
                self._rotate(f)
            except (OSError, _Stop) as exc:
                f.error = exc
                return True
        return False

    def _rotate(self, f: _File) -> None:
        """Copytruncate ``f`` if it is over ``max_bytes``; hold ``f.lock``.

        Only its last ``max_bytes`` bytes are copied to ``.1`` (all of it when
        within ``slack`` of the limit: a write just crossed it), then the
        live file is truncated to 0, right after the copy: what the child wrote
        in between is lost (copytruncate's caveat). What the reader had not
        read yet is kept in memory for it (``f.rotated``: up to ``CATCH_UP``
        bytes, from ``.1`` or, without backups, the live file)."""
        try:
            wfd = os.open(f.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise _Stop(f"{f.path} vanished") from None
        try:
            st = os.fstat(wfd)
            if (st.st_dev, st.st_ino) != f.ident:
                raise _Stop(f"{f.path} was replaced")
            size = st.st_size
            if size <= self.max_bytes:
                return
            # the reader is at least this far into the live file (not at all
            # while it has not taken the last rotation)
            read = min(f.offset if f.rotated is None else 0, size)
            lo = max(read, size - CATCH_UP)
            kept = ""
            if self.backups <= 0:
                blob = _read(wfd, lo, size)
                os.ftruncate(wfd, 0)  # the lossy window ends here
            else:
                start = 0
                if size > self.max_bytes + self.slack:
                    start = _line_start(wfd, size - self.max_bytes, size)
                # Into the oldest copy, overwritten in place: freeing a file's
                # blocks (a rename over it, O_TRUNC) is a file system
                # transaction that can take tens of milliseconds on a busy
                # disk, all of it written to the live file meanwhile.
                oldest = _backup(f.path, self.backups)
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                backup = os.open(oldest, flags, 0o600)
                try:
                    _copy(wfd, backup, start, size)
                    os.ftruncate(wfd, 0)  # right after the copy: the lossy window ends here
                    os.ftruncate(backup, size - start)  # the end of what it held before
                    lo = max(lo, start)  # before: not kept
                    blob = _read(backup, lo - start, size - start)
                finally:
                    os.close(backup)
                kept = self._shift(f.path)
        finally:
            os.close(wfd)
        f.rotated = _Rotated(f.gen_start + lo, blob, f.gen_start + size, kept)
        f.gen_start += size

    def _drop_cut_line(self, f: _File) -> None:
        """After a truncation, an unfinished last line lost its end with it (a
        write crossing a page boundary can be seen half done): drop it rather
        than join it to whatever the file says next."""
        if f.partial:
            logger.debug(
                "{} of {}: dropped {} bytes of a line cut by rotation",
                f.stream,
                f.instance_id,
                len(f.partial),
            )
            f.partial = b""

    def _shift(self, path: str) -> str:
        """The oldest copy, just rewritten, becomes ``.1``, the others one
        older; no rename replaces a file. Return the name of ``.1``."""
        first = _backup(path, 1)
        if self.backups > 1:
            moving = f"{path}.rotating"
            os.replace(_backup(path, self.backups), moving)
            for i in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(_backup(path, i), _backup(path, i + 1))
            os.rename(moving, first)
        return first

    # -- bookkeeping

    def _stop(self, f: _File, exc: BaseException) -> None:
        logger.warning("stopped following {} of {}: {}", f.stream, f.instance_id, exc)
        self._flush(f)
        files = self._instances.get(f.instance_id)
        if files is not None and f in files:
            files.remove(f)
        self._close(f)

    def _close(self, f: _File) -> None:
        if f in self._files:
            self._files.remove(f)
        self._unwatch(f)
        if self._rotator is not None:
            self._rotator.remove(f)
        with f.lock:  # not while it is being rotated
            f.closed = True
        self._release(f)

    def _open(self, f: _File) -> int:
        """The reader's fd of ``f``, opened by path if it is not open: the same
        file it followed (``_Stop`` if it was deleted or replaced meanwhile)."""
        if f.fd >= 0:
            return f.fd
        try:
            fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise _Stop(f"{f.path} was deleted") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != f.ident:
                raise _Stop(f"{f.path} was replaced")
        except BaseException:
            os.close(fd)
            raise
        f.fd = fd
        return fd

    def _release(self, f: _File) -> None:
        """Close the reader's fd of ``f`` until the next read."""
        fd, f.fd = f.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read(fd: int, start: int, end: int | None) -> bytes:
    """``fd``'s bytes from ``start`` to ``end`` (or to its end)."""
    chunks = []
    while end is None or start < end:
        data = os.pread(fd, CHUNK if end is None else min(CHUNK, end - start), start)
        if not data:
            break
        chunks.append(data)
        start += len(data)
    return b"".join(chunks)


def _copy(src: int, dst: int, start: int, end: int) -> None:
    """Copy ``src``'s bytes from ``start`` to ``end`` to the start of ``dst``,
    within the kernel (``copy_file_range``) where it can."""
    pos = start
    if hasattr(os, "copy_file_range"):
        while pos < end:
            try:
                n = os.copy_file_range(src, dst, end - pos, pos, pos - start)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                break  # not between these file systems: by hand
            if n == 0:
                return
            pos += n
    while pos < end:
        chunk = os.pread(src, min(COPY_CHUNK, end - pos), pos)
        if not chunk:
            return
        os.pwrite(dst, chunk, pos - start)
        pos += len(chunk)


def _line_start(fd: int, at: int, end: int) -> int:
    """Where the first line that starts at or after ``at`` starts (``at`` if
    none starts within ``LONG_LINE`` bytes)."""
    head = os.pread(fd, min(LONG_LINE, end - at), at)
    nl = head.find(b"\n")
    return at + nl + 1 if nl >= 0 and at + nl + 1 < end else at


def _backup(path: str, i: int) -> str:
    return f"{path}.{i}"


def _cut(buf: bytes | bytearray, limit: int) -> int:
    """Where to split ``buf`` at most ``limit`` bytes in, not inside a UTF-8 character."""
    cut = limit
    while cut > limit - 3 and buf[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut
