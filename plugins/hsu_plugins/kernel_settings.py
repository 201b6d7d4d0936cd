"""Essential: registers the ``kernel``, ``storage`` and ``cache`` sections of a deployment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu
from hsu.cache import CacheSettings
from hsu.ports import StorageSettings


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register("kernel", hsu.KernelSettings)
    register("storage", StorageSettings)
    register("cache", CacheSettings)
