"""Built-in circuit breakers: consecutive (the default), ratio, none.

A unit picks one with ``routing: {breaker: NAME, breaker_options: {...}}``
(the options structured into ``ConsecutiveOptions``, ``RatioOptions`` or
``NoneOptions``); a caller keeps one breaker per instance. ``closed``: calls
go through and their outcomes are counted. ``open``: no call goes through
until ``cooldown`` seconds have passed. ``half_open``: up to ``trials`` calls at a time go
through; ``successes`` successes close the breaker, any failure opens it
again (for ``cooldown`` doubled each time, up to ``max_cooldown``, when that
is set).

No breaker runs a timer: the state is worked out from the clock when it is
asked for; ``retry_in`` tells a caller that has no instance to call how long
until an open one turns half-open. An outcome that arrives while the breaker is open, or in
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
from collections.abc import Callable
from typing import Any

import attrs

import hsu
from hsu.config import Seconds
from hsu.ports import Factory, Register

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

Clock = Callable[[], float]

DEFAULT_COOLDOWN = 5.0
DEFAULT_WINDOW = 20
DEFAULT_MIN_CALLS = 10


# -- options -------------------------------------------------------------------


def _finite(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"'{attribute.name}' must be a finite number, got {value!r}")


def _not_below_cooldown(inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    cooldown = inst.cooldown
    if value is None or not (math.isfinite(cooldown) and cooldown > 0):
        return  # no max, or a cooldown that is itself refused
    if value < cooldown:
        raise ValueError(f"'{attribute.name}' must be >= cooldown ({cooldown:g}), got {value:g}")


def _within_window(inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    window = inst.window
    if value is not None and window >= 1 and value > window:
        raise ValueError(f"'{attribute.name}' must be 1 to window ({window}), got {value}")


@attrs.frozen
class BreakerOptions:
    """What the consecutive and ratio breakers share."""

    #: seconds an opening lasts
    cooldown: Seconds = attrs.field(
        default=DEFAULT_COOLDOWN, validator=[_finite, attrs.validators.gt(0)]
    )
    #: each reopening doubles the cooldown, up to this; none: no growth
    max_cooldown: Seconds | None = attrs.field(
        default=None, validator=[_finite, _not_below_cooldown]
    )
    #: calls let through at a time in half_open
    trials: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: successes in half_open that close the breaker
    successes: int = attrs.field(default=1, validator=attrs.validators.ge(1))


@attrs.frozen
class ConsecutiveOptions(BreakerOptions):
    #: failures in a row that open the breaker
    failures: int = attrs.field(default=5, validator=attrs.validators.ge(1))


@attrs.frozen
class RatioOptions(BreakerOptions):
    #: the last calls looked at
    window: int = attrs.field(default=DEFAULT_WINDOW, validator=attrs.validators.ge(1))
    #: the fewest calls in the window before it may open; none: 10, or window
    #: when that is smaller
    min_calls: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional([attrs.validators.ge(1), _within_window]),
    )
    #: the share of failed calls that opens it
    ratio: float = attrs.field(
        default=0.5, validator=[attrs.validators.gt(0), attrs.validators.le(1)]
    )


@attrs.frozen
class NoneOptions:
    """The none breaker takes no options."""


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

    @property
    def retry_in(self) -> float:
        """Seconds until an open breaker turns half-open (0 when it is not
        open): a caller with no instance to call waits this long at most."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._open_for - self._clock())

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
        ConsecutiveOptions(  # refuses a bad value, naming it
            failures=failures,
            cooldown=cooldown,
            max_cooldown=max_cooldown,
            trials=trials,
            successes=successes,
        )
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
        RatioOptions(  # refuses a bad value, naming it
            window=window,
            min_calls=min_calls,
            ratio=ratio,
            cooldown=cooldown,
            max_cooldown=max_cooldown,
            trials=trials,
            successes=successes,
        )
        if min_calls is None:
            min_calls = min(DEFAULT_MIN_CALLS, window)
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

    options = ConsecutiveOptions

    def create(
        self, options: ConsecutiveOptions, *, clock: Clock = time.monotonic
    ) -> ConsecutiveBreaker:
        return ConsecutiveBreaker(**attrs.asdict(options), clock=clock)


class RatioFactory:
    """``ratio``: opens on a share of failures over a sliding window of calls."""

    options = RatioOptions

    def create(self, options: RatioOptions, *, clock: Clock = time.monotonic) -> RatioBreaker:
        return RatioBreaker(**attrs.asdict(options), clock=clock)


class NoneFactory:
    """``none``: no breaker; every call goes through."""

    options = NoneOptions

    def create(self, options: NoneOptions, *, clock: Clock = time.monotonic) -> NoBreaker:
        return NoBreaker()


@hsu.hookimpl
def hsu_register_breakers(register: Register[Factory]) -> None:
    register("consecutive", ConsecutiveFactory(), default=True)
    register("ratio", RatioFactory())
    register("none", NoneFactory())
