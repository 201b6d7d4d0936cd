"""An instance: one slot of a unit, with its own state machine.

A slot outlives the processes it runs: a crashed process is replaced in the
same slot (same instance id, a new pid, ``restarts`` + 1), the way supervisor
and systemd keep one program entry across restarts.

::

    stopped -> starting -> ready -> stopping -> stopped
                  |          |
                  +----------+--> backoff -> starting   (restart policy)
                                     |
                                     +--> fatal          (crash-loop breaker)
"""

from __future__ import annotations

import asyncio
import base64
import enum
import os
import time
from collections.abc import Mapping

import attrs

from hsu._kernel.lifecycle import StateMachine
from hsu.identity import ENV_TOKEN
from hsu.identity import TOKEN_METADATA as TOKEN_METADATA
from hsu.ports import ProcessHandle


class InstanceState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    #: waiting to be restarted
    BACKOFF = "backoff"
    #: the crash-loop breaker is open: no restart until started again
    FATAL = "fatal"


S = InstanceState
INSTANCE_TRANSITIONS: Mapping[InstanceState, frozenset[InstanceState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.STOPPING, S.BACKOFF, S.STOPPED, S.FATAL}),
    S.READY: frozenset({S.STOPPING, S.BACKOFF, S.STOPPED, S.FATAL}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FATAL}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.FATAL}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}


#: the environment variable that hands a spawned instance its secret, and the
#: gRPC metadata key that carries it (one definition: :mod:`hsu.identity`)
ENV_INSTANCE_TOKEN = ENV_TOKEN


def new_instance_id(unit: str) -> str:
    """``<unit>-`` and 8 random hex digits (as ``uuid4().hex[:8]``, all
    random, without making a UUID object)."""
    return f"{unit}-{os.urandom(4).hex()}"


@attrs.define(eq=False)
class Instance:
    """What the kernel knows about one instance.

    ``managed`` instances belong to a unit the kernel supervises; others
    registered themselves (instances of an ``unmanaged`` unit, with the unit's
    token) and are only listed, probed and routed to.
    """

    instance_id: str
    unit: str
    managed: bool
    machine: StateMachine[InstanceState] = attrs.field(init=False)
    pid: int = 0
    address: str = ""
    interfaces: tuple[str, ...] = ()
    version: str = ""
    metadata: dict[str, str] = attrs.field(factory=dict)
    started_at: float = attrs.field(factory=time.time)
    registered_at: float | None = None
    ready_at: float | None = None
    returncode: int | None = None
    #: processes started in this slot after the first
    restarts: int = 0
    #: why the last process ended (or failed to start)
    last_exit: str = ""
    #: "unknown", "healthy" or "unhealthy", from the unit's health probe
    health: str = "unknown"
    #: when a routed call last picked it (for ``idle_timeout``)
    last_used: float = attrs.field(factory=time.monotonic)
    #: held by a lease (``hsu.lease``)
    leased: bool = False
    #: adopted from a kernel that ran before (re-attached, not spawned)
    reattached: bool = False
    handle: ProcessHandle | None = attrs.field(default=None, repr=False)
    #: (pid, its start time) as the state file records it, read once per
    #: process rather than at every save (a save walks every instance)
    pid_created: tuple[int, float] | None = attrs.field(default=None, repr=False)
    #: the secret of the process now in this slot (:meth:`new_token`); what it
    #: proves itself with. "" for a slot whose process the kernel did not spawn
    token: str = attrs.field(default="", repr=False)
    #: the current start attempt: resolved when ready, failed when it fails
    ready: asyncio.Future[None] = attrs.field(init=False, repr=False)
    _registered: asyncio.Future[None] | None = attrs.field(init=False, repr=False, default=None)
    _next: asyncio.Future[None] | None = attrs.field(init=False, repr=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.machine = StateMachine(
            f"instance {self.instance_id}", InstanceState.STOPPED, INSTANCE_TRANSITIONS
        )
        self.ready = self.next_attempt()

    @property
    def registered(self) -> asyncio.Future[None]:
        """The current attempt's handshake (an integrated HSU's Register); made
        when first asked for: a managed instance never is."""
        if self._registered is None:
            self._registered = _future()
        return self._registered

    def new_token(self) -> str:
        """A new random secret for the process about to be spawned in this slot
        (the last process's secret stops working)."""
        self.token = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        return self.token

    def next_attempt(self) -> asyncio.Future[None]:
        """The ``ready`` future of the next start attempt (made once, shared)."""
        if self._next is None:
            self._next = _future()
        return self._next

    def begin_attempt(self) -> asyncio.Future[None]:
        """Called as an attempt starts: ``ready`` becomes its future."""
        self.ready = self.next_attempt()
        self._next = None
        self._registered = None
        return self.ready

    def end_attempts(self, exc: BaseException) -> None:
        """No attempt will come: fail whoever waits for one."""
        for fut in (self.ready, self._next):
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    @property
    def state(self) -> InstanceState:
        return self.machine.state

    @property
    def alive(self) -> bool:
        return self.state in (InstanceState.STARTING, InstanceState.READY)


def _future() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.add_done_callback(_retrieve)
    return fut


def _retrieve(fut: asyncio.Future[None]) -> None:
    """A failed attempt nobody waited for is not an "exception never retrieved".
    (A module function: a lambda would be a new function object per future.)"""
    if not fut.cancelled():
        fut.exception()
