"""Essential: registers the ``kernel`` section of a deployment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register("kernel", hsu.KernelSettings)
