"""Supervision of one unit: its instances, restarts, health and limits.

Each instance slot is driven by one task (:meth:`UnitSupervisor._run`) that
starts a process, waits until it is ready, watches it (exit, health probe,
stop or restart requests) and, when it ends, applies the restart policy:
backoff, then a new process in the same slot, until the crash-loop breaker
trips. All process work for a slot happens in that task, in order, so there
is no race between a stop request and a restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import errno
import gc
import os
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import grpc
from google.protobuf.duration_pb2 import Duration
from loguru import logger

from hsu._kernel.config.model import (
    BreakerAction,
    CrashLoop,
    RestartPolicy,
    UnitKind,
    UnitSpec,
    read_unit_env_file,
    structure_options,
)
from hsu._kernel.logsetup import ENV_LOG_FORMAT
from hsu._kernel.supervision.containment import ENV_INSTANCE_ID as ENV_INSTANCE_ID
from hsu._kernel.supervision.instances import (
    ENV_INSTANCE_TOKEN,
    TOKEN_METADATA,
    Instance,
    InstanceState,
    new_instance_id,
)
from hsu._kernel.supervision.resources import open_files_note
from hsu._kernel.supervision.statefile import SavedInstance
from hsu.config import EnvFileError, child_env
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import ConfigError, HsuError, LaunchError
from hsu.ports import LaunchSpec, ProbeResult, ProbeTarget, ProcessHandle
from hsu.process import PidfdHandle

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel

S = InstanceState
#: what the kernel tells every instance it starts, in its environment
ENV_KERNEL_ADDRESS = "HSU_KERNEL_ADDRESS"
ENV_UNIT = "HSU_UNIT"
#: of a unit's stop_grace, the share an HSU is told it has to drain; the rest is
#: headroom for it to exit before SIGKILL
SHUTDOWN_SHARE = 0.8
#: fields whose change needs new processes; any other change applies live
PROCESS_FIELDS = (
    "command", "args", "kind", "env", "pass_env", "cwd", "launcher", "pidfile", "address",
    "allow_kill",
)  # fmt: skip


def needs_new_processes(old: UnitSpec, new: UnitSpec) -> bool:
    return any(getattr(old, f) != getattr(new, f) for f in PROCESS_FIELDS) or (
        old.limits.rlimits != new.limits.rlimits
    )


class Breaker:
    """Crash-loop breaker: ``max_failures`` within ``window`` seconds opens it.

    After a cooldown it is half-open: one start is tried, and its failure opens
    it again at once; an instance that stays ready for ``backoff.reset_after``
    closes it.
    """

    __slots__ = ("failures", "half_open", "spec")  # one per instance

    def __init__(self, spec: CrashLoop):
        self.spec = spec
        # a list, not a deque: an empty deque costs ~600 bytes per instance
        self.failures: list[float] = []
        self.half_open = False

    def failure(self, now: float) -> bool:
        """Record a failure; True if the breaker is now open."""
        if self.half_open:
            return True
        self.failures.append(now)
        window = self.spec.window
        if now - self.failures[0] > window:
            self.failures = [t for t in self.failures if now - t <= window]
        return len(self.failures) >= self.spec.max_failures

    def reset(self) -> None:
        self.half_open = False
        self.failures.clear()


#: seconds at least before an instance that could not start for want of file
#: descriptors tries again (spread over half as much again)
EXHAUSTED_DELAY = 2.0


def _out_of_files(exc: BaseException) -> bool:
    """Whether a start failed because the kernel or the system ran out of
    file descriptors (EMFILE, ENFILE), anywhere in the exception's causes."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def backoff_delay(spec: UnitSpec, streak: int, rng: random.Random | None = None) -> float:
    """Seconds before restart number ``streak`` (1-based) of a failure streak."""
    if streak <= 1:
        return 0.0
    b = spec.restart.backoff
    delay = min(b.max, b.initial * b.multiplier ** (streak - 2))
    if b.jitter:
        delay *= 1 + (rng or random).uniform(-b.jitter, b.jitter)
    return max(0.0, delay)


@attrs.define
class _Control:
    """What the outside asks of a slot's task; the task and its breaker
    (one record per slot, not one dict entry each)."""

    breaker: Breaker

    #: a command waits to be taken (an asyncio.Event would cost a deque and,
    #: to be awaited with others, a task per instance)
    woke: bool = False
    _waiter: asyncio.Future[None] | None = None
    #: None, "stop", "restart" or "start"
    command: str | None = None
    reason: str = ""
    grace: float | None = None
    wanted: bool = True
    #: failures in a row (reset once ready for backoff.reset_after)
    streak: int = 0
    task: asyncio.Task[None] | None = None
    #: counted in ``_queued``: the task is made and has not run yet
    queued: bool = False

    def enqueue(self) -> None:
        """Its task is about to be made: one more start to come."""
        global _queued
        _queued += 1
        self.queued = True

    def unqueue(self, _: object = None) -> None:
        """The task ran, or ended without ever running (cancelled at once):
        it no longer counts as a start to come."""
        if self.queued:
            self.queued = False
            global _queued
            _queued -= 1

    def ask(self, command: str, reason: str, grace: float | None = None) -> None:
        if self.command == "stop":
            return  # a stop is never downgraded
        self.command, self.reason, self.grace = command, reason, grace
        self.woke = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def woken(self) -> asyncio.Future[None]:
        """A future done once a command waits (at once if one does)."""
        w = self._waiter
        if w is None or w.cancelled() or (w.done() and not self.woke):
            w = self._waiter = asyncio.get_running_loop().create_future()
        if self.woke and not w.done():
            w.set_result(None)
        return w

    def take(self) -> str | None:
        command, self.command = self.command, None
        self.woke = False
        return command


#: a ready instance, as :meth:`UnitSupervisor._watch` takes it: its handle,
#: its exit and its control's wake-up
_Up = tuple["ProcessHandle | None", "asyncio.Future[int]", "asyncio.Future[None]"]


@attrs.define
class _Outcome:
    #: stopped on request, or asked to restart (neither is a failure)
    requested: str | None = None
    returncode: int | None = None
    reason: str = ""
    failed: bool = False
    #: the kernel ran out of file descriptors: wait before trying again, even
    #: the first time (every instance would retry at once: a storm)
    exhausted: bool = False


class UnitSupervisor:
    # slots: one per unit, and a thousand units of one instance are a shape
    __slots__ = ("_aux", "_controls", "_spec", "kernel", "name", "respecified", "slots")

    def __init__(self, kernel: Kernel, name: str, spec: UnitSpec):
        self.kernel = kernel
        self.name = name
        self._spec = spec
        #: resolved (and replaced) when a reload gives the unit a new spec
        self.respecified: asyncio.Future[None] | None = None
        self.slots: dict[str, Instance] = {}
        self._controls: dict[str, _Control] = {}
        self._aux: list[asyncio.Task[None]] | None = None

    @property
    def log(self) -> Any:
        """``logger.bind(unit=name)``, bound for each message rather than kept
        (~400 bytes a unit; a unit logs a few lines a start)."""
        return logger.bind(unit=self.name)

    @property
    def breakers(self) -> dict[str, Breaker]:
        """Each slot's crash-loop breaker (a new dict each time: kept per slot)."""
        return {iid: ctl.breaker for iid, ctl in self._controls.items()}

    def _ilog(self, instance: str) -> Any:
        return logger.bind(unit=self.name, instance=instance)

    @property
    def spec(self) -> UnitSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: UnitSpec) -> None:
        self._spec = spec
        if self.respecified is not None and not self.respecified.done():
            self.respecified.set_result(None)
        self.respecified = None

    # -- the outside -------------------------------------------------------

    @property
    def wanted(self) -> list[Instance]:
        return [i for i in self.slots.values() if self._controls[i.instance_id].wanted]

    def start_aux(self) -> None:
        """Start the watchers (``hsu_register_watchers``) that want this unit:
        idle instances, resource limits; again after a reload."""
        for task in self._aux or ():
            task.cancel()
        self._aux = None
        for name, watcher in self.kernel.plugins.all("watcher").items():
            try:
                wanted = watcher.wants(self.name, self.spec)
            except Exception as exc:
                self.log.error("watcher {!r}: wants() failed: {!r}", name, exc)
                continue
            if wanted:
                if self._aux is None:
                    self._aux = []
                self._aux.append(asyncio.ensure_future(self._run_watcher(name, watcher)))

    async def _run_watcher(self, name: str, watcher: Any) -> None:
        try:
            await watcher.watch(self.kernel, self.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.opt(exception=exc).error(
                "watcher {!r} of unit {!r} failed: {!r}; the unit runs on unwatched",
                name,
                self.name,
                exc,
            )

    def add_slot(self, saved: SavedInstance | None = None) -> Instance:
        inst = Instance(saved.instance_id if saved else new_instance_id(self.name), self.name, True)
        if saved is not None:
            inst.restarts = saved.restarts
            inst.started_at = saved.started_at
            inst.token = saved.token
        self.slots[inst.instance_id] = inst
        ctl = self._controls[inst.instance_id] = _Control(Breaker(self.spec.restart.crash_loop))
        self.kernel.adopt(inst)
        if saved is None:
            _starts(self.kernel).add(inst.instance_id)
        ctl.enqueue()  # until its task first runs (see _spawn)
        ctl.task = asyncio.ensure_future(self._run(inst, ctl, saved))
        # also if the task is cancelled before it first runs (its body never
        # does): a start to come would keep the spawn thread in use, and a
        # pending first start the collector paused
        ctl.task.add_done_callback(ctl.unqueue)
        if saved is None:
            ctl.task.add_done_callback(_starts(self.kernel).ended(inst.instance_id))
        return inst

    async def scale(self, count: int, reason: str = "scaled") -> None:
        """Run ``count`` instances: start new slots or stop the surplus."""
        wanted = self.wanted
        if count > len(wanted):
            new = [self.add_slot() for _ in range(count - len(wanted))]
            await all_settled([i.ready for i in new])
        elif count < len(wanted):
            order = {S.FATAL: 0, S.BACKOFF: 1, S.STOPPED: 1, S.STARTING: 2, S.READY: 3}
            victims = sorted(wanted, key=lambda i: (order.get(i.state, 2), -i.started_at))
            await asyncio.gather(
                *(self.remove(i, reason=reason) for i in victims[: len(wanted) - count])
            )

    async def remove(self, inst: Instance, *, reason: str, grace: float | None = None) -> None:
        """Stop the slot's process and drop the slot."""
        await self.stop(inst, reason=reason, grace=grace)
        self.slots.pop(inst.instance_id, None)
        self._controls.pop(inst.instance_id, None)
        self.kernel.forget(inst)

    async def stop(self, inst: Instance, *, reason: str, grace: float | None = None) -> None:
        """Stop the slot's process; the slot stays, ``stopped``, not wanted."""
        ctl = self._controls.get(inst.instance_id)
        task = ctl.task if ctl is not None else None
        if ctl is None or task is None:
            return
        ctl.wanted = False
        ctl.ask("stop", reason, grace)
        await asyncio.shield(task)

    async def stop_all(self, reason: str, grace: float | None = None) -> None:
        for task in self._aux or ():
            task.cancel()
        await asyncio.gather(
            *(self.stop(i, reason=reason, grace=grace) for i in self.slots.values())
        )

    def restart(self, inst: Instance, reason: str) -> Awaitable[None]:
        """Replace the slot's process (not counted as a failure); await for ready."""
        ctl = self._controls[inst.instance_id]
        task = ctl.task
        if task is None or task.done():
            return self.start(inst, reason)
        following = inst.next_attempt()
        ctl.ask("restart", reason)
        return asyncio.ensure_future(settled(following))

    def start(self, inst: Instance, reason: str = "started by request") -> Awaitable[None]:
        """Start a stopped or fatal slot again (the breaker is reset)."""
        ctl = self._controls[inst.instance_id]
        ctl.breaker.reset()
        ctl.streak = 0
        ctl.wanted = True
        task = ctl.task
        if task is None or task.done():
            following = inst.next_attempt()
            ctl.task = asyncio.ensure_future(self._run(inst, ctl, None))
            return asyncio.ensure_future(settled(following))
        if inst.state in (S.FATAL, S.BACKOFF):
            following = inst.next_attempt()
            ctl.ask("start", reason)
            return asyncio.ensure_future(settled(following))
        return asyncio.ensure_future(settled(inst.ready))

    async def acquire(self) -> Instance:
        """A ready instance, starting one if there is none and max allows.

        Callers asking at the same time share one start; a caller arriving
        while an instance backs off waits for its next attempt.
        """
        wanted = self.wanted
        ready = [i for i in wanted if i.state is S.READY]
        if ready:
            return min(ready, key=lambda i: i.last_used)
        coming = [i for i in wanted if i.state in (S.STARTING, S.STOPPED)]
        if coming:
            inst = coming[0]
            await asyncio.shield(inst.ready)
            return inst
        if len(wanted) < self.spec.max_instances:
            inst = self.add_slot()
            await asyncio.shield(inst.ready)
            return inst
        backing_off = [i for i in wanted if i.state is S.BACKOFF]
        if backing_off:
            inst = backing_off[0]
            await asyncio.shield(inst.next_attempt())
            return inst
        states = ", ".join(f"{i.instance_id} {i.state.value}" for i in wanted)
        last = next((i.last_exit for i in wanted if i.last_exit), "")
        raise LaunchError(
            f"unit {self.name!r} has no ready instance ({states or 'none wanted'})"
            + (f"; last exit: {last}" if last else "")
        )

    # -- one slot ----------------------------------------------------------

    async def _run(self, inst: Instance, ctl: _Control, saved: SavedInstance | None) -> None:
        ctl.unqueue()
        log: Any = _InstanceLog(self.name, inst.instance_id)
        try:
            first = True
            while True:
                command = ctl.take()
                if command == "stop" or not ctl.wanted:
                    break
                attempt = await self._attempt(inst, ctl, saved if first else None)
                first = False
                # ready: _attempt's frame is gone while the instance runs
                outcome = (
                    await self._watch(inst, ctl, *attempt)
                    if isinstance(attempt, tuple)
                    else attempt
                )
                await self._end_rest(inst)
                if outcome.requested == "stop":
                    break
                if outcome.requested == "restart":
                    inst.restarts += 1
                    continue
                if not await self._after_exit(inst, ctl, outcome, log):
                    break
                inst.restarts += 1
        except Exception:
            log.exception("supervising instance {} failed", inst.instance_id)
            raise
        finally:
            inst.end_attempts(
                HsuError(f"instance {inst.instance_id} stopped: {ctl.reason or inst.last_exit}")
            )
            if inst.state is not S.STOPPED:
                inst.machine.move(S.STOPPED, ctl.reason or inst.last_exit)
            _starts(self.kernel).end(inst.instance_id)
            self.kernel.save_state()

    async def _end_rest(self, inst: Instance) -> None:
        """The process is gone and its group signalled: end what it started
        that left the group (a daemon's setsid and double fork), so nothing of
        it outlives it (:mod:`hsu._kernel.supervision.containment`)."""
        if self.spec.kind is UnitKind.UNMANAGED:
            return
        left = await self.kernel.containment.end(inst.instance_id, inst.pid)
        if left:
            _InstanceLog(self.name, inst.instance_id).warning(
                "killed {} process(es) pid {} left outside its process group: {}",
                len(left),
                inst.pid,
                " ".join(map(str, left)),
            )

    async def _after_exit(self, inst: Instance, ctl: _Control, outcome: _Outcome, log: Any) -> bool:
        """Apply the restart policy; True to start again."""
        policy = self.spec.restart.policy
        inst.last_exit = self.kernel.deployment.secrets.redact(outcome.reason)
        clean = outcome.returncode == 0 and not outcome.failed
        if policy is RestartPolicy.NEVER or (policy is RestartPolicy.ON_FAILURE and clean):
            ctl.wanted = False
            ctl.reason = f"{outcome.reason} (restart: {policy.value})"
            (log.error if outcome.failed else log.info)(
                "{}; not restarting (restart: {})", outcome.reason, policy.value
            )
            return False
        now = time.monotonic()
        breaker = ctl.breaker
        if inst.ready_at is not None and time.time() - inst.ready_at >= (
            self.spec.restart.backoff.reset_after
        ):
            # it stayed up: the streak is over, and a half-open breaker closes
            ctl.streak = 0
            breaker.reset()
        ctl.streak += 1
        while breaker.failure(now):
            cl = self.spec.restart.crash_loop
            what = (
                f"crash loop: {len(breaker.failures)} failures within {cl.window:g}s"
                if not breaker.half_open
                else "crash loop: failed again after the cooldown"
            )
            if cl.action is BreakerAction.FATAL:
                inst.machine.move(S.FATAL, f"{what}; last: {outcome.reason}")
                log.error(
                    "{}; last: {}; giving up until `hsu start {}`", what, outcome.reason, self.name
                )
                command = await self._wait_command(ctl, None)
            else:
                inst.machine.move(S.FATAL, f"{what}; open for {cl.cooldown:g}s")
                log.error("{}; last: {}; trying again in {:g}s", what, outcome.reason, cl.cooldown)
                command = await self._wait_command(ctl, cl.cooldown)
                if command is None:
                    breaker.half_open = True
                    return True
            if command == "stop":
                return False
            breaker.reset()
            ctl.streak = 0
            return True
        delay = backoff_delay(self.spec, ctl.streak)
        if outcome.exhausted:
            delay = max(delay, EXHAUSTED_DELAY * (1 + random.uniform(0, 0.5)))
        inst.machine.move(S.BACKOFF, f"{outcome.reason}; restarting in {delay:.2f}s")
        if delay:
            log.warning("{}; restarting in {:.2f}s", outcome.reason, delay)
        else:
            log.warning("{}; restarting", outcome.reason)
        command = await self._wait_command(ctl, delay) if delay else ctl.take()
        return command != "stop"

    async def _wait_command(self, ctl: _Control, timeout: float | None) -> str | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ctl.woken()), timeout)
        return ctl.take()

    async def _attempt(
        self, inst: Instance, ctl: _Control, saved: SavedInstance | None
    ) -> _Outcome | _Up:
        """One process in the slot, from its start until it is ready (what
        :meth:`_watch` needs then) or has ended (how)."""
        spec = self.spec
        log: Any = _InstanceLog(self.name, inst.instance_id)
        inst.begin_attempt()
        inst.address, inst.registered_at, inst.ready_at, inst.health = "", None, None, "unknown"
        # not the last process's pid: the next one's is known once spawned
        inst.pid = saved.pid if saved else 0
        reason = f"re-attaching to pid {saved.pid}" if saved else ""
        inst.machine.move(S.STARTING, reason)
        try:
            handle = self._attach(inst, saved) if saved else await self._spawn(inst)
        except LaunchError as exc:
            _starts(self.kernel).end(inst.instance_id, failed=True)
            exhausted = _out_of_files(exc)
            if exhausted:
                exc = LaunchError(f"{exc}; {open_files_note()}")
            # logged once, by the restart policy with what happens next
            inst.ready.set_exception(exc)
            return _Outcome(reason=str(exc), failed=True, exhausted=exhausted)
        exited = _exit_future(handle) if handle else _never()
        woken = ctl.woken()
        if self._ready_once_running():
            # nothing to wait for: no task, no asyncio.wait (which, with many
            # instances starting at once, would add ~6 KiB each to the peak)
            self._now_ready(inst)
            return handle, exited, woken
        readying = asyncio.ensure_future(self._become_ready(inst, saved))
        up = False
        try:
            waiting: set[asyncio.Future[Any]] = {exited, woken, readying}
            done, _ = await asyncio.wait(
                waiting,
                timeout=spec.startup_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if readying in done and readying.exception() is None:
                up = True
                self._now_ready(inst)
                return handle, exited, woken
            if exited in done:
                return self._exited_early(inst, exited.result())
            if woken in done:
                return await self._requested(inst, ctl, handle, exited)
            if readying in done:
                why = f"not ready: {readying.exception()}"
            else:
                why = f"not ready within startup_timeout={spec.startup_timeout:g}s"
            msg = f"unit {self.name!r}: instance {inst.instance_id} (pid {inst.pid}) {why}"
            inst.ready.set_exception(LaunchError(msg))
            log.error("{}; stopping it", msg)
            await self._terminate(inst, handle, exited, spec.stop_grace, "not ready")
            return _Outcome(returncode=inst.returncode, reason=why, failed=True)
        finally:
            readying.cancel()
            if not up:
                woken.cancel()

    async def _watch(
        self,
        inst: Instance,
        ctl: _Control,
        handle: ProcessHandle | None,
        exited: asyncio.Future[int],
        woken: asyncio.Future[Any],
    ) -> _Outcome:
        while True:
            # a probe task only for units with a probe (a task per idle instance
            # costs memory); a reload that adds or drops one wakes this loop
            monitor = (
                asyncio.ensure_future(self._monitor(inst)) if self.spec.health is not None else None
            )
            if self.respecified is None:
                self.respecified = asyncio.get_running_loop().create_future()
            first = _FirstDone(
                (exited, woken, self.respecified) if monitor is None
                else (exited, woken, self.respecified, monitor)
            )  # fmt: skip
            try:
                await first.waiter
            finally:
                first.close()
                if monitor is not None and not monitor.done():
                    monitor.cancel()
            if exited.done() or woken.done() or (monitor is not None and monitor.done()):
                break
        if exited.done():
            code = exited.result()
            inst.returncode = code
            self.kernel.logs_drain(inst)
            return _Outcome(returncode=code, reason=_status(code))
        if woken.done():
            return await self._requested(inst, ctl, handle, exited)
        assert monitor is not None
        why = f"unhealthy: {monitor.result()}"
        self._ilog(inst.instance_id).warning("{}; replacing it", why)
        await self._terminate(inst, handle, exited, self.spec.stop_grace, why)
        return _Outcome(returncode=inst.returncode, reason=why, failed=True)

    def _exited_early(self, inst: Instance, code: int) -> _Outcome:
        inst.returncode = code
        self.kernel.logs_drain(inst)
        tail = self.kernel.output_tail(inst)
        last = ("; last output:\n    " + "\n    ".join(tail)) if tail else ""
        why = f"{_status(code)} before it was ready"
        inst.ready.set_exception(
            LaunchError(
                f"unit {self.name!r}: instance {inst.instance_id} (pid {inst.pid}) {why}{last}"
            )
        )
        return _Outcome(returncode=code, reason=why, failed=True)

    async def _requested(
        self,
        inst: Instance,
        ctl: _Control,
        handle: ProcessHandle | None,
        exited: asyncio.Future[int],
    ) -> _Outcome:
        command = ctl.take()
        if command == "start":  # already starting or up: nothing to do
            return await self._requested_again(inst, ctl, handle, exited)
        grace = ctl.grace if ctl.grace is not None else self.spec.stop_grace
        if not inst.ready.done():
            inst.ready.set_exception(HsuError(f"instance {inst.instance_id}: {ctl.reason}"))
        await self._terminate(inst, handle, exited, grace, ctl.reason)
        inst.last_exit = self.kernel.deployment.secrets.redact(ctl.reason)
        if command == "restart":
            inst.machine.move(S.STOPPED, ctl.reason)
        return _Outcome(requested=command or "stop", returncode=inst.returncode)

    async def _requested_again(
        self,
        inst: Instance,
        ctl: _Control,
        handle: ProcessHandle | None,
        exited: asyncio.Future[int],
    ) -> _Outcome:
        woken = ctl.woken()
        if inst.state is S.READY:
            return await self._watch(inst, ctl, handle, exited, woken)
        waiting: set[asyncio.Future[Any]] = {exited, woken}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            return self._exited_early(inst, exited.result())
        return await self._requested(inst, ctl, handle, exited)

    # -- processes ---------------------------------------------------------

    def _argv(self) -> list[str]:
        argv = list(self.spec.argv)
        if argv[0] == "python":
            argv[0] = sys.executable
        return argv

    async def _spawn(self, inst: Instance) -> ProcessHandle | None:
        if self.spec.kind is UnitKind.UNMANAGED:
            return self._attach_unmanaged(inst)
        kernel = self.kernel
        # the file system work first: on the spawn thread while more new
        # slots wait to start (a launch, a scale-up), so the loop forks
        # meanwhile; here for a lone start or restart, which a thread's
        # round trip would only delay. (The only await before the launch:
        # what follows reads the spec as it is now.)
        cgroup = kernel.containment.reserve(inst.instance_id)
        if cgroup is not None or not kernel.logfiles.known(inst.instance_id):
            if _queued > 0:
                problem = await _preparer.prepare(self, inst.instance_id, cgroup)
            else:
                problem = self._prepare(inst.instance_id, cgroup)
            if problem:
                kernel.containment.unreserve(inst.instance_id, problem)
                cgroup = None
        spec = self.spec
        launcher = kernel.plugins.launcher(spec.launcher)
        try:  # read as each instance starts: a changed file reaches the next one
            from_file = read_unit_env_file(spec, kernel.deployment.base_dir)
        except EnvFileError as exc:
            raise LaunchError(f"unit {self.name!r}: env_file: {exc}") from None
        env = {
            # the kernel's environment only as far as the unit lets it through
            **_inherited(spec.pass_env),
            **from_file,
            **spec.env,
            **kernel.plugins.instance_env(kernel, self.name, inst.instance_id),
            ENV_KERNEL_ADDRESS: kernel.control_address,
            ENV_UNIT: self.name,
            ENV_INSTANCE_ID: inst.instance_id,
            ENV_LOG_FORMAT: kernel.log_format,
            # what this process proves itself with (Register, Deregister,
            # ReportLoad) and expects on Core.Shutdown; new for every spawn
            ENV_INSTANCE_TOKEN: inst.new_token(),
            **kernel.peer_env(spec.env),
        }
        base = kernel.deployment.base_dir
        cwd = str(Path(base, spec.cwd)) if spec.cwd else base
        try:
            out, err = kernel.logfiles.open_for_child(self.name, inst.instance_id)
        except OSError as exc:
            raise LaunchError(
                f"unit {self.name!r}: cannot open its log files in"
                f" {str(kernel.logfiles.directory)!r}: {exc.strerror}"
            ) from exc
        launch = LaunchSpec(
            self.name,
            inst.instance_id,
            self._argv(),
            env,
            cwd,
            stdout=out,
            stderr=err,
            rlimits=spec.limits.rlimits,
            nofile_soft=kernel.child_nofile,
            die_with_kernel=not kernel.kernel_settings.reattach,
            cgroup=cgroup,
        )
        try:
            # watched before the child runs, through the fds open here, from
            # where the last process's output ends: every line of the new one
            # is seen by the watch, none is read twice
            kernel.logfiles.follow(self.name, inst.instance_id, 0, fds=(out, err))
            handle: ProcessHandle = await launcher.launch(launch)
            inst.handle, inst.pid, inst.returncode = handle, handle.pid, None
            inst.started_at = time.time()
            kernel.logfiles.set_pid(inst.instance_id, handle.pid)
        finally:
            os.close(out)
            os.close(err)
        argv = kernel.deployment.secrets.redact(" ".join(launch.argv))
        _starts(kernel).started(
            self._ilog(inst.instance_id), self.name, inst.instance_id, handle.pid, argv
        )
        self.kernel.save_state()
        return handle

    def _prepare(self, instance_id: str, cgroup: str | None) -> str:
        """On the spawn thread: create the instance's log files (if new) and
        its cgroup; returns why the cgroup could not be made ("" if it was)."""
        kernel = self.kernel
        kernel.logfiles.prepare(self.name, instance_id)
        return kernel.containment.make(cgroup) if cgroup is not None else ""

    def _attach(self, inst: Instance, saved: SavedInstance) -> ProcessHandle:
        launcher = self.kernel.plugins.launcher(self.spec.launcher)
        attach = getattr(launcher, "attach", None)
        if attach is None:
            raise LaunchError(f"launcher {self.spec.launcher!r} cannot re-attach")
        handle: ProcessHandle = attach(saved.pid)
        inst.handle, inst.pid, inst.reattached = handle, saved.pid, True
        self.kernel.containment.adopt(inst.instance_id, saved.pid)
        inst.address, inst.interfaces = saved.address, saved.interfaces
        self.kernel.logfiles.follow(self.name, inst.instance_id, saved.pid, from_start=False)
        self._ilog(inst.instance_id).info(
            "re-attached to pid {} at {}", saved.pid, saved.address or "-"
        )
        return handle

    def _attach_unmanaged(self, inst: Instance) -> ProcessHandle | None:
        spec = self.spec
        inst.address = spec.address or ""
        if not spec.pidfile:
            return None
        path = Path(self.kernel.deployment.base_dir, spec.pidfile)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise LaunchError(f"unit {self.name!r}: pidfile {str(path)!r}: {exc}") from None
        handle = PidfdHandle.attach(pid, owned=False)
        inst.handle, inst.pid = handle, pid
        self._ilog(inst.instance_id).info("attached to pid {} ({})", pid, path)
        return handle

    def _ready_once_running(self) -> bool:
        """Whether :meth:`_become_ready` has nothing to wait for."""
        spec = self.spec
        return spec.health is None and (
            spec.kind is UnitKind.MANAGED
            or (spec.kind is UnitKind.UNMANAGED and bool(spec.pidfile))
        )

    def _now_ready(self, inst: Instance) -> None:
        inst.ready_at = time.time()
        self.kernel.metrics_hub.instance_ready(inst)
        inst.machine.move(S.READY, "ready")
        inst.ready.set_result(None)
        self.kernel.save_state()

    async def _become_ready(self, inst: Instance, saved: SavedInstance | None) -> None:
        spec = self.spec
        if self._ready_once_running():  # _attempt does not call us then; one definition
            return
        if spec.kind is UnitKind.INTEGRATED and saved is None:
            await inst.registered
            if self.kernel.kernel_settings.cluster_key:
                await self._check_guarded(inst)
        health = spec.health
        if health is None:
            # the default probe (a plugin declares it) checks a re-attached HSU
            # and an unmanaged one found by address; without one (its plugin
            # blocked), a re-attached process that is alive counts as ready, and
            # an unmanaged unit by address was refused when the config was read
            probe = self.kernel.plugins.default("probe")
            if probe is None:
                return
            reattached = spec.kind is UnitKind.INTEGRATED and saved is not None
            if reattached or spec.kind is UnitKind.UNMANAGED:  # by address (pidfile: above)
                await self._probe_until_ok(inst, probe, 0.2, 1.0, 1)
            return
        if health.initial_delay:
            await asyncio.sleep(health.initial_delay)
        await self._probe_until_ok(
            inst,
            health.probe,
            min(health.interval, 0.2),
            health.timeout,
            health.success_threshold,
            health.options,
        )

    async def _check_guarded(self, inst: Instance) -> None:
        """With a cluster key, an instance must refuse a call without the
        cluster's proof (``hsu-peer``, docs/multihost.md): the kernel makes
        one unsigned call to a method no one serves; UNAUTHENTICATED is the
        answer of a server that checks, anything else (UNIMPLEMENTED) of one
        that takes every caller, which is not made ready."""
        method = "/hsu.peer.v1.Check/Unsigned"
        try:
            async with grpc.aio.insecure_channel(inst.address) as channel:
                await channel.unary_unary(method)(b"", timeout=5.0)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        if code is not grpc.StatusCode.UNAUTHENTICATED:
            raise LaunchError(
                f"it answers calls without the cluster's proof (an unsigned call got"
                f" {code.name}, not UNAUTHENTICATED) at {inst.address}: with"
                " kernel.cluster_key an HSU must check hsu-peer (hsu.worker does;"
                " docs/multihost.md)"
            )

    async def _probe_until_ok(
        self,
        inst: Instance,
        probe_name: str,
        interval: float,
        timeout: float,
        needed: int,
        options: Any = None,
    ) -> None:
        ok = 0
        while ok < needed:
            result = await self._probe(inst, probe_name, timeout, options)
            ok = ok + 1 if result.ok else 0
            if ok < needed:
                await asyncio.sleep(interval)
        inst.health = "healthy"

    async def _probe(
        self, inst: Instance, probe_name: str, timeout: float, options: Any
    ) -> ProbeResult:
        probe = self.kernel.plugins.probe(probe_name)
        path = ("units", self.name, "health", "options")
        try:
            structured = structure_options(probe, options, path, self.kernel.deployment.source)
        except ConfigError as exc:  # accepted when loaded; cannot happen unless a plugin changed
            return ProbeResult(False, "; ".join(exc.problems))
        target = ProbeTarget(self.name, inst.instance_id, inst.pid, inst.address, structured)
        try:
            result: ProbeResult = await asyncio.wait_for(probe.check(target, timeout), timeout)
        except TimeoutError:
            return ProbeResult(False, f"{probe_name} probe timed out after {timeout:g}s")
        except Exception as exc:
            result = ProbeResult(False, f"{probe_name} probe raised {exc!r}")
        # a detail may quote what the probe saw (an exec probe's output, an
        # HTTP body): resolved secrets never reach logs, events or status
        hidden = self.kernel.deployment.secrets.redact(result.detail)
        return result if hidden == result.detail else ProbeResult(result.ok, hidden)

    async def _monitor(self, inst: Instance) -> str:
        """Run the health probe while the instance is ready; return why it is unhealthy."""
        failures = 0
        while True:
            health = self.spec.health
            if health is None:
                await asyncio.sleep(3600)
                continue
            await asyncio.sleep(health.interval)
            result = await self._probe(inst, health.probe, health.timeout, health.options)
            if result.ok:
                failures = 0
                if inst.health != "healthy":
                    inst.health = "healthy"
                    self.kernel.routing.update(inst)
                continue
            failures += 1
            self._ilog(inst.instance_id).warning(
                "health probe failed ({}/{}): {}", failures, health.failure_threshold, result.detail
            )
            if failures >= health.failure_threshold:
                inst.health = "unhealthy"
                self.kernel.routing.update(inst)
                why = f"{failures} {health.probe} probes failed; last: {result.detail}"
                self.kernel.events.publish(
                    "worker",
                    topic="worker.unhealthy",
                    unit=self.name,
                    instance_id=inst.instance_id,
                    pid=inst.pid,
                    reason=why,
                )
                return why

    async def _terminate(
        self,
        inst: Instance,
        handle: ProcessHandle | None,
        exited: asyncio.Future[int],
        grace: float,
        reason: str,
    ) -> None:
        """Ask the process to stop; SIGKILL its process group after the grace."""
        if inst.state is not S.STOPPING:
            inst.machine.move(S.STOPPING, reason)
        log: Any = _InstanceLog(self.name, inst.instance_id)
        if handle is None or (self.spec.kind is UnitKind.UNMANAGED and not self.spec.allow_kill):
            exited.cancel()
            log.info("detached from {} (unmanaged: not stopped)", inst.pid or inst.address)
            return
        if handle.returncode is None and inst.address:
            left = await self.kernel.routing.drain(inst, self.spec.routing.drain_timeout)
            if left:
                log.warning(
                    "{} calls still in flight after drain_timeout={:g}s; stopping anyway",
                    left,
                    self.spec.routing.drain_timeout,
                )
        if handle.returncode is None:
            asked = (
                self.spec.kind is not UnitKind.MANAGED
                and bool(inst.address)
                and await self._ask_shutdown(inst, grace * SHUTDOWN_SHARE, reason)
            )
            if not asked:
                handle.signal(signal.Signals[self.spec.stop_signal])
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), grace)
        except TimeoutError:
            log.warning("pid {} still running {:g}s after stop; sending SIGKILL", inst.pid, grace)
            handle.signal(signal.SIGKILL)
            code = await exited
        inst.returncode = code
        self.kernel.logs_drain(inst)
        log.info("pid {} {}", inst.pid, _status(code))

    async def _ask_shutdown(self, inst: Instance, grace: float, reason: str) -> bool:
        try:
            async with grpc.aio.insecure_channel(inst.address) as channel:
                stub = core_pb2_grpc.CoreStub(channel)
                d = Duration()
                d.FromNanoseconds(int(grace * 1e9))
                reply = await stub.Shutdown(
                    core_pb2.ShutdownRequest(grace=d, reason=reason),
                    timeout=1.0,
                    metadata=((TOKEN_METADATA, inst.token),) if inst.token else None,
                )
                return bool(reply.accepted)
        except grpc.aio.AioRpcError as exc:
            self._ilog(inst.instance_id).debug(
                "Core.Shutdown failed ({}); sending {}", exc.code().name, self.spec.stop_signal
            )
            return False


#: the thread an instance's spawn creates its cgroup and log files on: a
#: fraction of a millisecond each (cgroupfs, ext4), which a launch of many
#: spends beside the event loop's own work (the forks) rather than before it
_spawn_pool: concurrent.futures.ThreadPoolExecutor | None = None
#: slots added whose task has not run yet (in this process): more spawns are
#: coming, and the spawn thread is worth its round trip
_queued = 0


def _spawn_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _spawn_pool
    if _spawn_pool is None:
        _spawn_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hsu-spawn")
    return _spawn_pool


class _Preparer:
    """:meth:`UnitSupervisor._prepare` calls, in order, on the spawn thread:
    one executor job for as many as are asked for meanwhile, each answered
    through a plain future. (``run_in_executor`` per instance would hold a
    ``concurrent.futures.Future`` with its condition, a work item and a
    wrapping future for each of a launch's queued instances at once: ~1.8
    MiB more RSS after a launch of 1,000, never given back.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the two below
        self._jobs: list[tuple[UnitSupervisor, str, str | None, asyncio.Future[str]]] = []
        self._busy = False

    def prepare(
        self, sup: UnitSupervisor, instance_id: str, cgroup: str | None
    ) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._jobs.append((sup, instance_id, cgroup, fut))
            start, self._busy = not self._busy, True
        if start:
            try:
                _spawn_thread().submit(self._work)
            except BaseException:  # no thread (shut down): raised here, as run_in_executor did
                with self._lock:
                    self._busy = False
                    self._jobs.clear()  # only ours: nothing else was taking them
                raise
        return fut

    def _work(self) -> None:
        while True:
            with self._lock:
                jobs, self._jobs = self._jobs, []
                if not jobs:
                    self._busy = False
                    return
            for sup, instance_id, cgroup, fut in jobs:
                try:
                    answer: tuple[str, BaseException | None] = (
                        sup._prepare(instance_id, cgroup),
                        None,
                    )
                except BaseException as exc:  # raised in the task, as run_in_executor did
                    answer = ("", exc)
                with contextlib.suppress(RuntimeError):  # its loop is closed
                    fut.get_loop().call_soon_threadsafe(_answer, fut, answer)


def _answer(fut: asyncio.Future[str], answer: tuple[str, BaseException | None]) -> None:
    if fut.done():  # its task was cancelled meanwhile
        return
    problem, exc = answer
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(problem)


_preparer = _Preparer()


def _status(code: int | None) -> str:
    if code is None:
        return "gone"
    if code == -256:
        return "exited (status unknown: not our child)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


async def settled(fut: asyncio.Future[None]) -> None:
    """Wait for a start attempt to end, successful or not."""
    with contextlib.suppress(Exception):
        await asyncio.shield(fut)


def all_settled(futs: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """A future done once every one of ``futs`` is, successful or not (what
    ``gather`` of :func:`settled` waits for, without a task and a shield for
    each of a launch's 1,000 instances). Cancelling it cancels none of them."""
    return _AllDone(futs).waiter


class _AllDone:
    __slots__ = ("left", "waiter")

    def __init__(self, futs: list[asyncio.Future[None]]):
        self.waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.left = len(futs)
        if not futs:
            self.waiter.set_result(None)
        for f in futs:
            f.add_done_callback(self._one, context=_QUIET)

    def _one(self, _: asyncio.Future[None]) -> None:
        self.left -= 1
        if self.left == 0 and not self.waiter.done():
            self.waiter.set_result(None)


class _Starts:
    """A kernel's new slots whose first process has not started yet. While
    more than one has not (a launch, a scale-up, a reload that adds units),
    each one's "started pid" line goes out at DEBUG (the kernel's log buffer
    keeps it: ``hsu logs UNIT`` shows it) and one INFO line sums them up once
    the last has started: at INFO, a launch of 1,000 wrote 1,000 lines through
    every sink, about a sixth of the event loop's CPU per spawn. A lone start,
    and every restart, still says ``started pid`` at INFO.

    The cyclic garbage collector is paused meanwhile, as while a deployment
    is read (``config.loader.gc_paused``): a launch of 1,000 ran it some 250
    times, ~0.1 ms of the loop's CPU per spawn, for ~4,000 objects in all."""

    __slots__ = ("failed", "gc_was", "pending", "started_n", "units")

    def __init__(self) -> None:
        #: the new slots' instance ids
        self.pending: set[str] = set()
        #: of the current batch (logged at DEBUG): how many started, of which
        #: units (each unit's command as its lines show it), how many failed
        self.started_n = 0
        self.units: dict[str, str] = {}
        self.failed = 0
        #: whether the collector was on when this batch paused it (None: not paused)
        self.gc_was: bool | None = None

    def add(self, instance_id: str) -> None:
        self.pending.add(instance_id)
        if len(self.pending) == 2 and self.gc_was is None:
            self.gc_was = gc.isenabled()
            gc.disable()

    def started(self, log: Any, unit: str, instance_id: str, pid: int, argv: str) -> None:
        """Log that ``pid`` started (as one of a batch, or on its own)."""
        batch = False
        if instance_id in self.pending:
            self.pending.discard(instance_id)
            batch = bool(self.pending or self.started_n or self.failed)
        if batch:
            log.debug("started pid {}: {}", pid, argv)
            self.started_n += 1
            self.units.setdefault(unit, argv)
        else:
            log.info("started pid {}: {}", pid, argv)
        self._settle()

    def end(self, instance_id: str, *, failed: bool = False) -> None:
        """The slot's first start will not come (``failed``: it failed; the
        restart policy logs why) or has come already (nothing to do)."""
        if instance_id not in self.pending:
            return
        self.pending.discard(instance_id)
        if failed and (self.pending or self.started_n):
            self.failed += 1
        self._settle()

    def ended(self, instance_id: str) -> Callable[[object], None]:
        """A done callback for the slot's task: :meth:`end` when it is done."""

        def done(_: object) -> None:
            self.end(instance_id)

        return done

    def _settle(self) -> None:
        """Once no first start is pending: the collector back on, the summary."""
        if self.pending:
            return
        if self.gc_was is not None:
            if self.gc_was:
                gc.enable()
            self.gc_was = None
        n, units, failed = self.started_n, self.units, self.failed
        self.started_n, self.units, self.failed = 0, {}, 0
        if not n:
            return
        also = f"; {failed} failed to start" if failed else ""
        if len(units) == 1:
            unit, argv = next(iter(units.items()))
            logger.bind(unit=unit).info(
                "unit {!r}: started {} instances: {}{} (their pids at debug level: hsu logs {})",
                unit, n, argv, also, unit,
            )  # fmt: skip
        else:
            names = ", ".join(map(repr, list(units)[:3])) + (", ..." if len(units) > 3 else "")
            logger.info(
                "started {} instances of {} units ({}){}"
                " (their pids at debug level: hsu logs UNIT)",
                n, len(units), names, also,
            )  # fmt: skip


#: each kernel's (a process may run several: tests)
_STARTS: weakref.WeakKeyDictionary[Kernel, _Starts] = weakref.WeakKeyDictionary()


def _starts(kernel: Kernel) -> _Starts:
    starts = _STARTS.get(kernel)
    if starts is None:
        starts = _STARTS[kernel] = _Starts()
    return starts


#: pass_env patterns -> (the kernel's environment when last asked, what
#: passed of it): a launch of 1,000 matched every variable 1,000 times
_passed: dict[tuple[str, ...], tuple[dict[Any, Any], dict[str, str]]] = {}


def _inherited(pass_env: tuple[str, ...]) -> dict[str, str]:
    """:func:`hsu.config.child_env` of the kernel's environment, made again
    only when that changed (compared as the bytes ``os.environ`` holds)."""
    data = getattr(os.environ, "_data", None)
    known = _passed.get(pass_env)
    if known is not None and known[0] == data:
        return known[1]
    passed = child_env(pass_env, os.environ)
    if isinstance(data, dict):
        if len(_passed) >= 64:  # patterns of units reloaded since
            _passed.clear()
        _passed[pass_env] = (dict(data), passed)
    return passed


#: the context :class:`_FirstDone` wakes its waiter in (setting a future's
#: result reads no context variable)
_QUIET = contextvars.Context()


class _FirstDone:
    """``waiter`` is done once any of ``futs`` is. What an idle instance waits
    on: ``asyncio.wait(return_when=FIRST_COMPLETED)`` would keep two coroutine
    frames, two sets and a closure per instance (~1.5 KiB); this keeps one
    future and one callback per awaited future. ``close()`` when done waiting."""

    __slots__ = ("_futs", "_wake", "waiter")

    def __init__(self, futs: tuple[asyncio.Future[Any], ...]):
        self._futs = futs
        self.waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = self._on_done  # one bound method, so remove_done_callback finds it
        for f in futs:
            # without context=, each call would copy the current context
            f.add_done_callback(self._wake, context=_QUIET)

    def _on_done(self, _: asyncio.Future[Any]) -> None:
        if not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        for f in self._futs:
            f.remove_done_callback(self._wake)
        self.waiter.cancel()


def _never() -> asyncio.Future[int]:
    return asyncio.get_running_loop().create_future()


def _exit_future(handle: ProcessHandle) -> asyncio.Future[int]:
    """The handle's exit as a future: its own when it offers one (no task per
    instance, as :class:`hsu.process.PidfdHandle` does), else a task on ``wait()``."""
    exited = getattr(handle, "exited", None)
    if callable(exited):
        fut = exited()
        if isinstance(fut, asyncio.Future):
            return fut
    return asyncio.ensure_future(handle.wait())


class _InstanceLog:
    """``logger.bind(instance=...)``, bound at the first message: a bound
    logger held by every idle slot's frames would cost ~700 bytes each."""

    __slots__ = ("_bound", "_instance", "_unit")

    def __init__(self, unit: str, instance: str):
        self._unit = unit
        self._instance = instance
        self._bound: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            self._bound = logger.bind(unit=self._unit, instance=self._instance)
        return getattr(self._bound, name)
