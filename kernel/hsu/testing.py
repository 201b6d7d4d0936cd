"""A pytest plugin for plugin and HSU authors (entry point ``pytest11: hsu``).

Fixtures:

``hsu_plugin_manager``
    A fresh :class:`hsu.PluginManager` with built-ins only (no autoload).

``hsu_kernel_factory``
    ``await hsu_kernel_factory(deployment_dict, plugins=[obj, ...])`` builds a
    kernel with its data plane on an ephemeral loopback port and its control
    plane on a unix socket in the test's temporary directory, registers the given plugin
    objects, starts it, and stops it (and every instance) after the test.
    Needs pytest-asyncio.

``hsu_free_address``
    A ``unix:`` address in the test's temporary directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from hsu._kernel.config.model import deployment_from_dict
from hsu._kernel.kernel import Kernel
from hsu._kernel.plugins import PluginManager

KernelFactory = Callable[..., Awaitable[Kernel]]


@pytest.fixture
def hsu_plugin_manager() -> PluginManager:
    return PluginManager.load(env={}, autoload=False)


@pytest.fixture
def hsu_free_address(tmp_path: Path) -> str:
    return f"unix:{tmp_path / 'kernel.sock'}"


def build_kernel(
    raw: dict[str, Any],
    *,
    plugins: Iterable[object] = (),
    names: Iterable[str] = (),
    address: str = "127.0.0.1:0",
    control: str | None = None,
    base_dir: str = ".",
) -> Kernel:
    """A kernel from a dict, with extra plugin objects registered from code.

    Its data plane listens on ``address`` (an ephemeral loopback port), its
    control plane on ``control`` (default: the unix socket in its state dir,
    ``<base_dir>/.hsu/<name>/control.sock``)."""
    deployment = deployment_from_dict(raw, source="<test>", base_dir=base_dir)
    pm = PluginManager.load([*deployment.plugins, *names], env={}, autoload=False)
    for plugin in plugins:
        pm.register(plugin)
    return Kernel(deployment, pm, address=address, control_address=control)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def hsu_kernel_factory(tmp_path: Path) -> AsyncIterator[KernelFactory]:
        kernels: list[Kernel] = []

        async def make(raw: dict[str, Any], **kwargs: Any) -> Kernel:
            kwargs.setdefault("base_dir", str(tmp_path))
            kernel = build_kernel(raw, **kwargs)
            kernels.append(kernel)
            await kernel.start()
            return kernel

        try:
            yield make
        finally:
            for kernel in reversed(kernels):
                await kernel.stop("test finished")
