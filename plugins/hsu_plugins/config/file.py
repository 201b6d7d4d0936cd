"""Config source: deployment files (YAML, JSON, TOML), priority 10, watchable."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import hsu
from hsu.config import read_file
from hsu.ports import ConfigSource, Layer, SourceContext

POLL_SECONDS = 1.0


class FileSource:
    priority = 10
    #: what of the SourceContext it reads: the deployment files given
    reads = ("files",)

    def load(self, ctx: SourceContext) -> list[Layer]:
        return [read_file(path) for path in ctx.files]

    def watch(self, ctx: SourceContext, on_change: Callable[[], None]) -> Awaitable[None] | None:
        if not ctx.files:
            return None
        return _poll(ctx.files, on_change)


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size


async def _poll(files: tuple[Path, ...], on_change: Callable[[], None]) -> None:
    """One stat() per file per second: cheap, and needs no extra dependency."""
    seen = {p: _stamp(p) for p in files}
    while True:
        await asyncio.sleep(POLL_SECONDS)
        now = {p: _stamp(p) for p in files}
        if now != seen:
            seen = now
            on_change()


@hsu.hookimpl
def hsu_register_config_sources(register: Callable[[str, ConfigSource], None]) -> None:
    register("file", FileSource())
