import enum

import pytest

from hsu._kernel.lifecycle import KERNEL_TRANSITIONS, KernelState, StateMachine
from hsu._kernel.supervision.instances import INSTANCE_TRANSITIONS, InstanceState
from hsu.errors import InvalidTransition


def kernel_machine() -> StateMachine[KernelState]:
    return StateMachine("kernel", KernelState.CREATED, KERNEL_TRANSITIONS)


def test_the_happy_path_is_allowed_and_recorded():
    m = kernel_machine()
    seen = []
    m.listeners.append(seen.append)
    for state in ("starting", "running", "stopping", "stopped"):
        m.move(KernelState(state), reason=f"to {state}")
    assert m.state is KernelState.STOPPED
    assert [(t.source.value, t.target.value) for t in m.history] == [
        ("created", "starting"),
        ("starting", "running"),
        ("running", "stopping"),
        ("stopping", "stopped"),
    ]
    assert [t.reason for t in seen] == ["to starting", "to running", "to stopping", "to stopped"]
    assert all(a.at <= b.at for a, b in zip(m.history, m.history[1:], strict=False))


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), KernelState.RUNNING),  # created -> running skips starting
        ((KernelState.STARTING,), KernelState.STOPPED),
        ((KernelState.STARTING, KernelState.RUNNING), KernelState.STARTING),
        ((KernelState.STOPPED,), KernelState.STARTING),  # stopped is final
    ],
)
def test_invalid_moves_raise_and_change_nothing(path, bad):
    m = kernel_machine()
    for s in path:
        m.move(s)
    before = (m.state, len(m.history))
    with pytest.raises(InvalidTransition) as info:
        m.move(bad)
    assert f"cannot go from {m.state.value!r} to {bad.value!r}" in str(info.value)
    assert (m.state, len(m.history)) == before


def test_error_lists_allowed_moves_or_says_final():
    m = kernel_machine()
    with pytest.raises(InvalidTransition, match=r"allowed: starting, stopped"):
        m.move(KernelState.RUNNING)
    m.move(KernelState.STOPPED)
    with pytest.raises(InvalidTransition, match="it is final"):
        m.move(KernelState.STARTING)


def test_failed_is_reachable_from_every_active_kernel_state():
    for state in (KernelState.STARTING, KernelState.RUNNING, KernelState.STOPPING):
        assert KernelState.FAILED in KERNEL_TRANSITIONS[state]


def test_instance_table_restarts_only_through_starting():
    # a slot is restarted in place: stopped, backoff and fatal lead only to starting
    assert INSTANCE_TRANSITIONS[InstanceState.STOPPED] == frozenset({InstanceState.STARTING})
    assert InstanceState.READY not in INSTANCE_TRANSITIONS[InstanceState.BACKOFF]
    assert InstanceState.READY not in INSTANCE_TRANSITIONS[InstanceState.FATAL]
    m = StateMachine("i", InstanceState.READY, INSTANCE_TRANSITIONS)
    m.move(InstanceState.STOPPING)
    with pytest.raises(InvalidTransition):
        m.move(InstanceState.READY)  # a stopping process never becomes ready again


def test_a_table_naming_unknown_states_is_rejected():
    class S(enum.Enum):
        A = "a"
        B = "b"

    with pytest.raises(ValueError, match="lacks states"):
        StateMachine("broken", S.A, {S.A: frozenset({S.B})})
