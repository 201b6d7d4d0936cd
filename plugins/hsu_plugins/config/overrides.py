"""Config source: ``--set PATH=VALUE`` on the command line, priority 30."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import hsu
from hsu.config import overrides_layer
from hsu.ports import ConfigSource, Layer, SourceContext


class OverridesSource:
    priority = 30
    #: what of the SourceContext it reads: the --set overrides
    reads = ("overrides",)

    def load(self, ctx: SourceContext) -> list[Layer]:
        return [overrides_layer(ctx.overrides)]

    def watch(self, ctx: SourceContext, on_change: Callable[[], None]) -> Awaitable[None] | None:
        return None


@hsu.hookimpl
def hsu_register_config_sources(register: Callable[[str, ConfigSource], None]) -> None:
    register("overrides", OverridesSource())
