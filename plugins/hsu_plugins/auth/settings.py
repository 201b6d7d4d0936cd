"""Registers the ``auth`` section of a deployment (docs/auth.md).

::

    auth:
      authenticators: [token]   # asked in this order; empty (the default): auth is off
      authorizers: [rbac]       # every one asked; a deny wins; no allow is a deny
      cache_ttl: 10             # seconds an authentication is reused per connection
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu
from hsu.ports import AuthSettings


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register("auth", AuthSettings)
