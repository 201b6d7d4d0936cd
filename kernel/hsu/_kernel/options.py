"""Checking a plugin's ``options`` mapping: for probes, balancers, breakers.

A unit passes options to the plugin it names (``health.options``,
``routing.balancer_options``, ...); the plugin's ``check_options`` returns
each problem as ``"key: what is wrong"``. :func:`check_option_types` finds the
problems every plugin shares (not a mapping, unknown keys, wrong types); the
plugin adds its own (ranges, combinations).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

#: the longest value quoted in a message
QUOTE_CHARS = 200

#: an option's type: (test, what it should be, for "expected ...")
OptionType = tuple[Callable[[object], bool], str]


def quote(value: object) -> str:
    """``repr(value)``, cut to ``QUOTE_CHARS``."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def check_option_types(
    options: Mapping[str, Any], known: Mapping[str, OptionType], owner: str
) -> list[str]:
    """Unknown keys (with the closest known one) and values of the wrong type.

    :param owner: what takes the options, for messages: ``"tcp probe"``.
    """
    if not isinstance(options, Mapping):
        return [f"options: expected a mapping, got {type(options).__name__}"]
    problems: list[str] = []
    for key, value in options.items():
        name = str(key)
        if name not in known:
            if not known:
                problems.append(f"{name}: unknown option (the {owner} takes no options)")
                continue
            listing = ", ".join(sorted(known))
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{name}: unknown option{hint} (known: {listing})")
            continue
        test, description = known[name]
        if not test(value):
            problems.append(f"{name}: expected {description}, got {quote(value)}")
    return problems
