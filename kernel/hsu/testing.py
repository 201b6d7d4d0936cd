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

:func:`require_node` finds node and npm and installs a Node.js package's
dependencies (``npm ci``) once, for tests of HSUs written in Node.js.

docs/testing.md describes them all.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
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


#: set to 1 and a test that needs node and npm fails instead of skipping
ENV_REQUIRE_NODE = "HSU_REQUIRE_NODE"
#: the longest ``npm ci`` may take
NPM_CI_TIMEOUT = 300.0


@attrs.frozen
class NodePackage:
    """A Node.js package with its dependencies installed."""

    package: str
    node: str
    npm: str


def _missing(what: str) -> None:
    if os.environ.get(ENV_REQUIRE_NODE, "") not in ("", "0"):
        pytest.fail(f"{what} ({ENV_REQUIRE_NODE} is set, so this test may not skip)")
    pytest.skip(what)


def require_node(
    package: str | os.PathLike[str], *, timeout: float = NPM_CI_TIMEOUT
) -> NodePackage:
    """Node and npm, and ``package``'s dependencies installed from its lockfile.

    Skips when node or npm is missing, or fails when ``HSU_REQUIRE_NODE`` is
    set. Runs ``npm ci --prefer-offline`` (bounded by ``timeout`` seconds)
    when ``node_modules`` is missing, under a file lock, so pytest-xdist
    workers install it once. Call it from a session-scoped fixture.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _missing("node and npm are needed (apt-get install nodejs npm)")
    assert node is not None and npm is not None
    root = Path(package).resolve()
    if not (root / "package-lock.json").is_file():
        raise FileNotFoundError(f"{root}: no package-lock.json to install from (npm ci needs one)")
    with (root / ".npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "node_modules").is_dir():
            cmd = [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"]
            try:
                done = subprocess.run(
                    cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired:
                shutil.rmtree(root / "node_modules", ignore_errors=True)
                _missing(f"{root}: npm ci took longer than {timeout:g} s")
            if done.returncode != 0:
                shutil.rmtree(root / "node_modules", ignore_errors=True)
                _missing(f"{root}: npm ci failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return NodePackage(str(root), node, npm)


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
