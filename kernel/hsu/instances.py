"""An instance: one running process of a unit, with its own state machine."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Mapping

import attrs

from hsu.lifecycle import StateMachine
from hsu.ports import ProcessHandle


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


S = InstanceState
INSTANCE_TRANSITIONS: Mapping[InstanceState, frozenset[InstanceState]] = {
    S.STARTING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}


def new_instance_id(unit: str) -> str:
    return f"{unit}-{uuid.uuid4().hex[:8]}"


@attrs.define(eq=False)
class Instance:
    """What the kernel knows about one HSU process.

    ``managed`` instances were started by this kernel and are stopped by it;
    others registered themselves and are only listed.
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
    returncode: int | None = None
    handle: ProcessHandle | None = attrs.field(default=None, repr=False)
    #: resolved when the handshake arrives, failed if it exits first
    ready: asyncio.Future[None] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.machine = StateMachine(
            f"instance {self.instance_id}", InstanceState.STARTING, INSTANCE_TRANSITIONS
        )
        self.ready = asyncio.get_running_loop().create_future()

    @property
    def state(self) -> InstanceState:
        return self.machine.state

    @property
    def alive(self) -> bool:
        return self.state in (InstanceState.STARTING, InstanceState.READY)
