"""The built-in circuit breakers, on a fake clock."""

from typing import Any

import pytest

import hsu_plugins.routing.breakers as breakers
from hsu._kernel.config.model import structure_options
from hsu.errors import ConfigError
from hsu.ports import CircuitBreaker, Factory
from hsu_plugins.routing.breakers import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    ConsecutiveBreaker,
    ConsecutiveFactory,
    ConsecutiveOptions,
    NoBreaker,
    NoneFactory,
    NoneOptions,
    RatioBreaker,
    RatioFactory,
    RatioOptions,
)


def structured(factory: Factory, options: Any) -> Any:
    """``options`` as the kernel structures them for ``factory``."""
    return structure_options(factory, options, ("breaker_options",), "d.yaml")


def problems(factory: Factory, options: Any) -> list[str]:
    """What the kernel reports for ``options``, without the source and path prefix."""
    with pytest.raises(ConfigError) as info:
        structured(factory, options)
    prefix = "d.yaml: breaker_options."
    assert all(p.startswith(prefix) for p in info.value.problems)
    return [p.removeprefix(prefix) for p in info.value.problems]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record(False)


def succeed(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record(True)


# -- the plugin --------------------------------------------------------------------


def test_the_plugin_manager_hands_out_the_breakers(hsu_plugin_manager, clock):
    pm = hsu_plugin_manager
    if "consecutive" not in pm.breaker_names():  # not yet a default plugin
        pm.register(breakers, "breakers")
    assert {"consecutive", "ratio", "none"} <= set(pm.breaker_names())
    factory = pm.breaker("consecutive")
    assert isinstance(factory, Factory)
    breaker = factory.create(structured(factory, {"failures": 2, "cooldown": 1}), clock=clock)
    assert isinstance(breaker, CircuitBreaker)
    fail(breaker, 2)
    assert breaker.state == OPEN
    assert isinstance(pm.breaker("none").create(NoneOptions()), CircuitBreaker)
    assert isinstance(pm.breaker("ratio").create(RatioOptions()), CircuitBreaker)


# -- consecutive -------------------------------------------------------------------


def test_consecutive_full_cycle(clock):
    b = ConsecutiveBreaker(3, cooldown=2.0, clock=clock)
    assert b.state == CLOSED
    fail(b, 2)
    succeed(b, 1)  # a success resets the count
    fail(b, 2)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN
    assert not b.allow()

    clock.advance(1.9)
    assert b.state == OPEN
    assert not b.allow()
    clock.advance(0.1)
    assert b.state == HALF_OPEN
    assert b.allow()  # the trial
    assert not b.allow()  # one trial at a time
    b.record(True)
    assert b.state == CLOSED

    fail(b, 2)  # counting starts again from zero
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN


def test_a_failed_trial_reopens_for_another_cooldown(clock):
    b = ConsecutiveBreaker(1, cooldown=2.0, clock=clock)
    fail(b, 1)
    clock.advance(2.0)
    assert b.allow()
    b.record(False)
    assert b.state == OPEN
    clock.advance(1.9)
    assert not b.allow()
    clock.advance(0.1)
    assert b.state == HALF_OPEN


def test_retry_in_tells_a_waiting_caller_when_the_opening_ends(clock):
    """``retry_in``: seconds until an open breaker turns half-open (what a
    call that no instance can take waits for), 0 when it is not open; a
    grown cooldown counts."""
    b = ConsecutiveBreaker(1, cooldown=2.0, max_cooldown=8.0, clock=clock)
    assert b.retry_in == 0.0
    fail(b, 1)
    assert b.retry_in == 2.0
    clock.advance(1.5)
    assert b.retry_in == 0.5
    clock.advance(0.5)
    assert b.retry_in == 0.0 and b.state == HALF_OPEN
    fail(b, 1)  # the trial fails: open for twice as long
    assert b.retry_in == 4.0
    r = RatioBreaker(window=2, min_calls=2, cooldown=3.0, clock=clock)
    fail(r, 2)
    assert r.retry_in == 3.0


def test_the_cooldown_doubles_up_to_max_cooldown_and_resets_on_close(clock):
    b = ConsecutiveBreaker(1, cooldown=1.0, max_cooldown=3.0, clock=clock)
    fail(b, 1)
    assert b.open_for == 1.0
    for expected in (2.0, 3.0, 3.0):
        clock.advance(b.open_for)
        fail(b, 1)  # the trial fails
        assert b.state == OPEN
        assert b.open_for == expected
    clock.advance(2.9)
    assert b.state == OPEN
    clock.advance(0.1)
    succeed(b, 1)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.open_for == 1.0


def test_without_max_cooldown_the_cooldown_stays(clock):
    b = ConsecutiveBreaker(1, cooldown=1.0, clock=clock)
    fail(b, 1)
    for _ in range(3):
        clock.advance(1.0)
        fail(b, 1)
        assert b.open_for == 1.0


def test_trials_and_successes(clock):
    b = ConsecutiveBreaker(1, cooldown=1.0, trials=2, successes=3, clock=clock)
    fail(b, 1)
    clock.advance(1.0)
    assert b.allow()
    assert b.allow()
    assert not b.allow()  # two trials at a time
    b.record(True)
    assert b.state == HALF_OPEN
    assert b.allow()  # the slot is free again
    b.record(True)
    b.record(True)
    assert b.state == CLOSED  # three successes


def test_any_failed_trial_reopens_even_after_successes(clock):
    b = ConsecutiveBreaker(1, cooldown=1.0, trials=2, successes=2, clock=clock)
    fail(b, 1)
    clock.advance(1.0)
    assert b.allow()
    assert b.allow()
    b.record(True)
    b.record(False)
    assert b.state == OPEN
    clock.advance(1.0)
    assert b.state == HALF_OPEN
    succeed(b, 1)
    assert b.state == HALF_OPEN  # the earlier success does not carry over
    succeed(b, 1)
    assert b.state == CLOSED


def test_stale_outcomes_are_ignored(clock):
    b = ConsecutiveBreaker(2, cooldown=1.0, clock=clock)
    for _ in range(5):
        assert b.allow()  # five calls go out while closed
    b.record(False)
    b.record(False)
    assert b.state == OPEN
    opened_for = b.open_for
    b.record(True)  # the others land while open: they change nothing
    b.record(False)
    assert b.state == OPEN
    assert b.open_for == opened_for
    clock.advance(0.99)
    assert b.state == OPEN  # a late failure did not restart the cooldown
    clock.advance(0.01)
    assert b.state == HALF_OPEN
    b.record(True)  # lands in half_open with no trial out: not a trial's
    assert b.state == HALF_OPEN
    assert b.allow()
    assert not b.allow()  # the stale outcome did not free or take a slot
    b.record(True)
    assert b.state == CLOSED


def test_an_outcome_while_closed_from_before_the_breaker_reclosed_counts_normally(clock):
    b = ConsecutiveBreaker(2, cooldown=1.0, clock=clock)
    fail(b, 2)
    clock.advance(1.0)
    succeed(b, 1)
    assert b.state == CLOSED
    b.record(False)  # one failure: below the threshold
    assert b.state == CLOSED


# -- ratio -------------------------------------------------------------------------


def test_ratio_needs_min_calls(clock):
    b = RatioBreaker(window=10, min_calls=4, ratio=0.5, clock=clock)
    fail(b, 3)
    assert b.state == CLOSED  # 3 of 3 failed, but fewer than min_calls
    fail(b, 1)
    assert b.state == OPEN


def test_ratio_over_a_sliding_window(clock):
    b = RatioBreaker(window=4, min_calls=4, ratio=0.5, cooldown=1.0, clock=clock)
    pattern = [True, False, True, True, True, False, True, True]  # never 2 of the last 4
    for ok in pattern:
        assert b.allow()
        b.record(ok)
        assert b.state == CLOSED
    # the window is now [F, T, T] + next; one more failure makes 2 of 4
    assert b.allow()
    b.record(False)
    assert b.state == OPEN


def test_ratio_forgets_outcomes_that_left_the_window(clock):
    b = RatioBreaker(window=5, min_calls=5, ratio=0.6, clock=clock)
    fail(b, 2)
    succeed(b, 3)  # 2 of 5
    succeed(b, 2)  # the failures slide out: 0 of 5
    fail(b, 2)  # 2 of 5
    assert b.state == CLOSED
    fail(b, 1)  # 3 of 5
    assert b.state == OPEN


def test_ratio_boundary_is_inclusive_and_exact(clock):
    b = RatioBreaker(window=10, min_calls=10, ratio=0.3, clock=clock)
    succeed(b, 7)
    fail(b, 2)
    assert b.state == CLOSED
    fail(b, 1)  # exactly 3 of 10 (0.3 * 10 is 3.0000000000000004 in floats)
    assert b.state == OPEN


def test_ratio_full_cycle_and_a_fresh_window_after_closing(clock):
    b = RatioBreaker(window=4, min_calls=2, ratio=0.6, cooldown=1.0, clock=clock)
    fail(b, 2)  # 2 of 2
    assert b.state == OPEN
    assert not b.allow()
    clock.advance(1.0)
    assert b.state == HALF_OPEN
    fail(b, 1)
    assert b.state == OPEN
    clock.advance(1.0)
    succeed(b, 1)
    assert b.state == CLOSED
    fail(b, 1)  # 1 of 1: below min_calls, the old window is gone
    assert b.state == CLOSED
    succeed(b, 1)  # 1 of 2
    assert b.state == CLOSED
    fail(b, 1)  # 2 of 3
    assert b.state == OPEN


def test_ratio_min_calls_defaults_to_at_most_the_window(clock):
    assert RatioBreaker(clock=clock).min_calls == 10
    small = RatioFactory().create(RatioOptions(window=4), clock=clock)
    assert small.min_calls == 4
    fail(small, 4)
    assert small.state == OPEN


# -- none --------------------------------------------------------------------------


def test_none_never_opens():
    b = NoneFactory().create(NoneOptions())
    assert isinstance(b, NoBreaker)
    for _ in range(1000):
        assert b.allow()
        b.record(False)
    assert b.state == CLOSED


# -- options -----------------------------------------------------------------------


def test_defaults(clock):
    b = ConsecutiveFactory().create(structured(ConsecutiveFactory(), {}), clock=clock)
    assert (b.failures, b.cooldown, b.max_cooldown, b.trials, b.successes) == (5, 5.0, None, 1, 1)
    r = RatioFactory().create(structured(RatioFactory(), {}), clock=clock)
    assert (r.window, r.min_calls, r.ratio) == (20, 10, 0.5)
    fail(b, 4)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN
    clock.advance(4.99)
    assert b.state == OPEN
    clock.advance(0.01)
    assert b.state == HALF_OPEN


def test_good_options_are_accepted():
    assert structured(ConsecutiveFactory(), {}) == ConsecutiveOptions()
    good = {"failures": 1, "cooldown": 0.5, "max_cooldown": 60, "trials": 3, "successes": 2}
    assert structured(ConsecutiveFactory(), good) == ConsecutiveOptions(**good)
    good = {"window": 5, "min_calls": 5, "ratio": 1}
    assert structured(RatioFactory(), good) == RatioOptions(**good)
    assert structured(NoneFactory(), {}) == NoneOptions()


def test_unknown_options_get_a_suggestion():
    assert problems(ConsecutiveFactory(), {"failure": 3}) == [
        "failure: unknown key; did you mean 'failures'?"
    ]
    assert problems(RatioFactory(), {"min_call": 3}) == [
        "min_call: unknown key; did you mean 'min_calls'?"
    ]
    assert problems(RatioFactory(), {"zzz": 3}) == ["zzz: unknown key"]
    assert problems(NoneFactory(), {"failures": 3}) == ["failures: unknown key (takes no options)"]


def test_wrong_types_are_refused():
    assert problems(
        ConsecutiveFactory(),
        {"failures": "3", "cooldown": True, "trials": 1.5, "max_cooldown": float("inf")},
    ) == [
        "cooldown: expected seconds or a duration (500ms, 5s, 2m), got True",
        "trials: expected int, got 1.5",
        "failures: expected int, got '3'",
        "max_cooldown: must be a finite number, got inf",
    ]
    assert problems(RatioFactory(), {"ratio": "half"}) == ["ratio: expected float, got 'half'"]
    with pytest.raises(ConfigError, match="breaker_options: expected a mapping, got"):
        structured(ConsecutiveFactory(), [1, 2])


def test_values_out_of_range_are_refused():
    assert problems(
        ConsecutiveFactory(), {"failures": 0, "cooldown": 0, "trials": 0, "successes": -1}
    ) == [
        "cooldown: must be > 0, got 0.0",
        "trials: must be >= 1, got 0",
        "successes: must be >= 1, got -1",
        "failures: must be >= 1, got 0",
    ]
    assert problems(ConsecutiveFactory(), {"cooldown": 10, "max_cooldown": 5}) == [
        "max_cooldown: must be >= cooldown (10), got 5"
    ]
    assert problems(ConsecutiveFactory(), {"max_cooldown": 1}) == [
        "max_cooldown: must be >= cooldown (5), got 1"
    ]
    assert problems(RatioFactory(), {"ratio": 0}) == ["ratio: must be > 0, got 0.0"]
    assert problems(RatioFactory(), {"ratio": 1.5}) == ["ratio: must be <= 1, got 1.5"]
    assert problems(RatioFactory(), {"window": 0}) == ["window: must be >= 1, got 0"]
    assert problems(RatioFactory(), {"window": 5, "min_calls": 6}) == [
        "min_calls: must be 1 to window (5), got 6"
    ]
    assert problems(RatioFactory(), {"min_calls": 21}) == [
        "min_calls: must be 1 to window (20), got 21"
    ]
    assert problems(RatioFactory(), {"min_calls": 0}) == ["min_calls: must be >= 1, got 0"]


def test_a_breaker_made_in_code_refuses_bad_values_too():
    with pytest.raises(ValueError, match="'failures' must be >= 1"):
        ConsecutiveBreaker(0)
    with pytest.raises(ValueError, match="'ratio' must be <= 1"):
        RatioBreaker(ratio=2)
    with pytest.raises(ValueError, match="'min_calls' must be 1 to window"):
        RatioBreaker(window=4, min_calls=5)
    with pytest.raises(ValueError, match="'max_cooldown' must be >= cooldown"):
        ConsecutiveBreaker(cooldown=2, max_cooldown=1)


def test_another_plugin_adds_a_breaker_but_cannot_take_a_builtin_name():
    import hsu
    from hsu._kernel.plugins import PluginManager
    from hsu.errors import ConflictError

    pm = PluginManager.load(env={}, autoload=False)

    class Mine:
        @hsu.hookimpl
        def hsu_register_breakers(self, register):
            register("never", breakers.NoneFactory())

    class Clash:
        @hsu.hookimpl
        def hsu_register_breakers(self, register):
            register("consecutive", breakers.NoneFactory())

    pm.register(Mine(), "mine")
    assert pm.breaker("never").create(NoneOptions()).allow()
    with pytest.raises(ConflictError, match="breaker 'consecutive'"):
        pm.register(Clash(), "clash")
    assert isinstance(
        pm.breaker("consecutive").create(ConsecutiveOptions()), breakers.ConsecutiveBreaker
    )
