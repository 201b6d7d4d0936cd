"""Essential: registers the ``kernel`` and ``storage`` sections of a deployment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu
from hsu.ports import StorageSettings


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register("kernel", hsu.KernelSettings)
    register("storage", StorageSettings)
