"""State machines with an enforced transition table and a kept history.

The kernel has one (:data:`KERNEL_TRANSITIONS`); each instance has one
(:mod:`hsu._kernel.supervision.instances`). A move the table does not allow raises
:class:`~hsu.errors.InvalidTransition` naming the machine, the current state
and the states that would have been allowed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import attrs

from hsu.errors import InvalidTransition


class KernelState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


KERNEL_TRANSITIONS: Mapping[KernelState, frozenset[KernelState]] = {
    KernelState.CREATED: frozenset({KernelState.STARTING, KernelState.STOPPED}),
    KernelState.STARTING: frozenset(
        {KernelState.RUNNING, KernelState.STOPPING, KernelState.FAILED}
    ),
    KernelState.RUNNING: frozenset({KernelState.STOPPING, KernelState.FAILED}),
    KernelState.STOPPING: frozenset({KernelState.STOPPED, KernelState.FAILED}),
    KernelState.STOPPED: frozenset(),
    KernelState.FAILED: frozenset(),
}

S = TypeVar("S", bound=enum.Enum)

#: transitions a machine remembers (an instance restarted for weeks must not grow)
HISTORY = 256


#: transition tables found complete, by id (each kept: its id is not reused)
_checked: dict[int, Mapping[Any, frozenset[Any]]] = {}


@attrs.frozen
class Transition(Generic[S]):
    source: S
    target: S
    at: float  # time.time()
    reason: str = ""


class StateMachine(Generic[S]):
    """A current state, the moves allowed from each state, and the history.

    ``listeners`` are called synchronously after each move with the
    :class:`Transition`; they must not raise. (Slots: there is one per
    instance, and a ``__dict__`` would double its size.)
    """

    __slots__ = ("_state", "_table", "history", "listeners", "name")

    def __init__(self, name: str, initial: S, table: Mapping[S, frozenset[S]]):
        if _checked.get(id(table)) is not table:  # once per table, not per instance
            missing = {s for targets in table.values() for s in targets} - set(table)
            if missing:
                raise ValueError(f"{name}: transition table lacks states {missing}")
            _checked[id(table)] = table
        if initial not in table:
            raise ValueError(f"{name}: transition table lacks states {set([initial])}")
        self.name = name
        self._state = initial
        self._table = table
        #: at least the last :data:`HISTORY` transitions, oldest first
        self.history: list[Transition[S]] = []
        self.listeners: list[Callable[[Transition[S]], None]] = []

    @property
    def state(self) -> S:
        return self._state

    def can(self, target: S) -> bool:
        return target in self._table[self._state]

    def move(self, target: S, reason: str = "") -> Transition[S]:
        allowed = self._table[self._state]
        if target not in allowed:
            options = ", ".join(sorted(str(s.value) for s in allowed)) or "none: it is final"
            raise InvalidTransition(
                f"{self.name}: cannot go from {self._state.value!r} to {target.value!r}"
                f" (allowed: {options})"
            )
        transition = Transition(self._state, target, time.time(), reason)
        self._state = target
        self.history.append(transition)
        if len(self.history) > 2 * HISTORY:
            del self.history[:HISTORY]
        for listener in self.listeners:
            listener(transition)
        return transition

    def __repr__(self) -> str:
        return f"<StateMachine {self.name} {self._state.value}>"
