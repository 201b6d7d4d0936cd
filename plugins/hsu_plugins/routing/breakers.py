"""Built-in circuit breakers: consecutive (the default), ratio, none.

A unit picks one with ``breaker: {kind: NAME, options: {...}}``; a caller
keeps one breaker per instance. ``closed``: calls go through and their
outcomes are counted. ``open``: no call goes through until ``cooldown``
seconds have passed. ``half_open``: up to ``trials`` calls at a time go
through; ``successes`` successes close the breaker, any failure opens it
again (for ``cooldown`` doubled each time, up to ``max_cooldown``, when that
is set).

No breaker runs a timer: the state is worked out from the clock when it is
asked for. An outcome that arrives while the breaker is open, or in
``half_open`` when no trial call is out, belongs to a call let through before
it opened; it is ignored rather than counted against the trials.

Options (``consecutive``): ``failures`` (5) in a row open it. Options
(``ratio``): it opens when, of the last ``window`` (20) calls and at least
``min_calls`` (10, at most ``window``), a share of ``ratio`` (0.5) or more
failed. Both take ``cooldown`` (5.0 s), ``max_cooldown`` (none: no growth),
``trials`` (1) and ``successes`` (1). ``none`` takes no options and never
opens.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import hsu
from hsu._kernel.options import OptionType, check_option_types
from hsu.ports import Factory

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

Clock = Callable[[], float]

#: the longest option value quoted in a problem

DEFAULT_COOLDOWN = 5.0
DEFAULT_WINDOW = 20
DEFAULT_MIN_CALLS = 10


# -- options -------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


#: option type: (test, description for "expected ...")
INT: OptionType = (_is_int, "an int")
NUMBER: OptionType = (_is_number, "a finite number")

#: what the consecutive and ratio breakers share
COMMON: Mapping[str, OptionType] = {
    "cooldown": NUMBER,
    "max_cooldown": NUMBER,
    "trials": INT,
    "successes": INT,
}


def _typed(options: Mapping[str, Any], key: str, test: Callable[[object], bool]) -> Any:
    """The option's value when it is there and of the right type, else None."""
    value = options.get(key)
    return value if value is not None and test(value) else None


def _check_common(options: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for key in ("trials", "successes"):
        value = _typed(options, key, _is_int)
        if value is not None and value < 1:
            problems.append(f"{key}: expected >= 1, got {value}")
    cooldown = _typed(options, "cooldown", _is_number)
    if cooldown is not None and cooldown <= 0:
        problems.append(f"cooldown: expected > 0 seconds, got {cooldown}")
    max_cooldown = _typed(options, "max_cooldown", _is_number)
    if max_cooldown is not None:
        floor = cooldown if cooldown is not None and cooldown > 0 else DEFAULT_COOLDOWN
        if max_cooldown < floor:
            problems.append(f"max_cooldown: expected >= cooldown ({floor:g}), got {max_cooldown}")
    return problems


def _reject(problems: list[str], kind: str) -> None:
    if problems:
        raise ValueError(f"{kind} breaker: bad options: {'; '.join(problems)}")


# -- breakers ------------------------------------------------------------------


class _Breaker:
    """Cooldown and half-open trials; subclasses count the outcomes while closed."""

    def __init__(
        self,
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        max_cooldown: float | None = None,
        trials: int = 1,
        successes: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        if not cooldown > 0:
            raise ValueError(f"cooldown: expected > 0 seconds, got {cooldown}")
        if max_cooldown is not None and max_cooldown < cooldown:
            raise ValueError(f"max_cooldown: expected >= cooldown ({cooldown:g})")
        if trials < 1:
            raise ValueError(f"trials: expected >= 1, got {trials}")
        if successes < 1:
            raise ValueError(f"successes: expected >= 1, got {successes}")
        self.cooldown = float(cooldown)
        self.max_cooldown = None if max_cooldown is None else float(max_cooldown)
        self.trials = trials
        self.successes = successes
        self._clock = clock
        self._state = CLOSED
        self._opened_at = 0.0
        #: how long this opening lasts (grows on a reopen, with max_cooldown)
        self._open_for = self.cooldown
        #: trial calls let through in half_open and not yet recorded
        self._trials_out = 0
        self._trial_successes = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``, as of the clock now."""
        if self._state == OPEN and self._clock() - self._opened_at >= self._open_for:
            self._state = HALF_OPEN
            self._trials_out = 0
            self._trial_successes = 0
        return self._state

    @property
    def open_for(self) -> float:
        """How long the current (or next) opening lasts, in seconds."""
        return self._open_for

    def allow(self) -> bool:
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN or self._trials_out >= self.trials:
            return False
        self._trials_out += 1
        return True

    def record(self, ok: bool) -> None:
        state = self.state
        if state == CLOSED:
            if self._count(ok):
                self._open(self.cooldown)
            return
        if state == OPEN or self._trials_out == 0:
            return  # the outcome of a call let through before the breaker opened
        self._trials_out -= 1
        if not ok:
            grown = self._open_for * 2
            capped = self.cooldown if self.max_cooldown is None else min(grown, self.max_cooldown)
            self._open(capped)
            return
        self._trial_successes += 1
        if self._trial_successes >= self.successes:
            self._state = CLOSED
            self._open_for = self.cooldown
            self._reset()

    def _open(self, open_for: float) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._open_for = open_for
        self._trials_out = 0
        self._trial_successes = 0
        self._reset()

    def _count(self, ok: bool) -> bool:
        """Count an outcome while closed; ``True`` opens the breaker."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget the outcomes counted while closed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state}>"


class ConsecutiveBreaker(_Breaker):
    """Opens after ``failures`` failures in a row; a success resets the count."""

    def __init__(
        self,
        failures: int = 5,
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        max_cooldown: float | None = None,
        trials: int = 1,
        successes: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures: expected >= 1, got {failures}")
        super().__init__(
            cooldown=cooldown,
            max_cooldown=max_cooldown,
            trials=trials,
            successes=successes,
            clock=clock,
        )
        self.failures = failures
        self._failed = 0

    def _count(self, ok: bool) -> bool:
        if ok:
            self._failed = 0
            return False
        self._failed += 1
        return self._failed >= self.failures

    def _reset(self) -> None:
        self._failed = 0


class RatioBreaker(_Breaker):
    """Opens when, of the last ``window`` calls (at least ``min_calls``), a
    share of ``ratio`` or more failed. ``min_calls`` defaults to 10, or
    ``window`` when that is smaller."""

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        min_calls: int | None = None,
        ratio: float = 0.5,
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        max_cooldown: float | None = None,
        trials: int = 1,
        successes: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError(f"window: expected >= 1, got {window}")
        if min_calls is None:
            min_calls = min(DEFAULT_MIN_CALLS, window)
        if not 1 <= min_calls <= window:
            raise ValueError(f"min_calls: expected 1 to window ({window}), got {min_calls}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: expected 0 < ratio <= 1, got {ratio}")
        super().__init__(
            cooldown=cooldown,
            max_cooldown=max_cooldown,
            trials=trials,
            successes=successes,
            clock=clock,
        )
        self.window = window
        self.min_calls = min_calls
        self.ratio = float(ratio)
        self._outcomes: collections.deque[bool] = collections.deque()
        self._failed = 0

    def _count(self, ok: bool) -> bool:
        outcomes = self._outcomes
        if len(outcomes) >= self.window and not outcomes.popleft():
            self._failed -= 1
        outcomes.append(ok)
        if not ok:
            self._failed += 1
        calls = len(outcomes)
        return calls >= self.min_calls and self._failed / calls >= self.ratio

    def _reset(self) -> None:
        self._outcomes.clear()
        self._failed = 0


class NoBreaker:
    """Never opens: every call goes through."""

    @property
    def state(self) -> str:
        return CLOSED

    def allow(self) -> bool:
        return True

    def record(self, ok: bool) -> None:
        pass

    def __repr__(self) -> str:
        return "<NoBreaker closed>"


# -- factories -----------------------------------------------------------------


class ConsecutiveFactory:
    """``consecutive``: opens after ``failures`` failures in a row."""

    options: Mapping[str, OptionType] = {"failures": INT, **COMMON}

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        problems = check_option_types(options, self.options, "consecutive breaker")
        if not isinstance(options, Mapping):
            return problems
        failures = _typed(options, "failures", _is_int)
        if failures is not None and failures < 1:
            problems.append(f"failures: expected >= 1, got {failures}")
        return problems + _check_common(options)

    def create(
        self, options: Mapping[str, Any], *, clock: Clock = time.monotonic
    ) -> ConsecutiveBreaker:
        _reject(self.check_options(options), "consecutive")
        return ConsecutiveBreaker(**options, clock=clock)


class RatioFactory:
    """``ratio``: opens on a share of failures over a sliding window of calls."""

    options: Mapping[str, OptionType] = {
        "window": INT,
        "min_calls": INT,
        "ratio": NUMBER,
        **COMMON,
    }

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        problems = check_option_types(options, self.options, "ratio breaker")
        if not isinstance(options, Mapping):
            return problems
        window = _typed(options, "window", _is_int)
        if window is not None and window < 1:
            problems.append(f"window: expected >= 1, got {window}")
        min_calls = _typed(options, "min_calls", _is_int)
        if min_calls is not None:
            # against the default window when window is missing or itself wrong
            limit = window if window is not None and window >= 1 else DEFAULT_WINDOW
            if not 1 <= min_calls <= limit:
                problems.append(f"min_calls: expected 1 to window ({limit}), got {min_calls}")
        ratio = _typed(options, "ratio", _is_number)
        if ratio is not None and not 0 < ratio <= 1:
            problems.append(f"ratio: expected 0 < ratio <= 1, got {ratio}")
        return problems + _check_common(options)

    def create(self, options: Mapping[str, Any], *, clock: Clock = time.monotonic) -> RatioBreaker:
        _reject(self.check_options(options), "ratio")
        return RatioBreaker(**options, clock=clock)


class NoneFactory:
    """``none``: no breaker; every call goes through."""

    options: Mapping[str, OptionType] = {}

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        return check_option_types(options, self.options, "none breaker")

    def create(self, options: Mapping[str, Any], *, clock: Clock = time.monotonic) -> NoBreaker:
        _reject(self.check_options(options), "none")
        return NoBreaker()


@hsu.hookimpl
def hsu_register_breakers(register: Callable[[str, Factory], None]) -> None:
    register("consecutive", ConsecutiveFactory())
    register("ratio", RatioFactory())
    register("none", NoneFactory())
