"""Config source: ``HSU_SECTION__KEY=value`` environment variables, priority 20."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import hsu
from hsu.config import env_layer
from hsu.ports import ConfigSource, Layer, SourceContext


class EnvSource:
    priority = 20
    #: what of the SourceContext it reads: the environment
    reads = ("env",)

    def load(self, ctx: SourceContext) -> list[Layer]:
        return [env_layer(ctx.env)]

    def watch(self, ctx: SourceContext, on_change: Callable[[], None]) -> Awaitable[None] | None:
        return None  # a process's environment does not change under it


@hsu.hookimpl
def hsu_register_config_sources(register: Callable[[str, ConfigSource], None]) -> None:
    register("env", EnvSource())
