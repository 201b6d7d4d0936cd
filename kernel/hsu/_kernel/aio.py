"""The one place where the asyncio kernel meets synchronous pluggy hooks."""

from __future__ import annotations

import inspect
from typing import Any


async def await_me_maybe(value: Any) -> Any:
    """Return ``value``, awaiting it first when a hook handed back an awaitable.

    Hooks are plain functions; one that must do I/O returns a coroutine (or any
    awaitable) and the kernel awaits it here. A callable is called first, so a
    hook may also return ``async def`` function to run later.
    """
    if callable(value) and not inspect.isclass(value):
        value = value()
    if inspect.isawaitable(value):
        value = await value
    return value
