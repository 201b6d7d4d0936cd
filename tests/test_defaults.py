"""Defaults are declared by the plugins that provide them; ``no:NAME`` blocks any
of them: a deployment that does not need the plugin runs, one that does is
told in one line which unit needs what, and which plugin is blocked."""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import run_hsu, write_deployment
from hsu._kernel.kernel import Kernel
from hsu._kernel.plugins import ESSENTIAL, PluginManager
from hsu.errors import ConfigError
from hsu.testing import build_kernel

pytestmark = pytest.mark.integration


def _builtin_defaults() -> list[str]:
    return sorted(
        ep.name
        for ep in md.entry_points(group="hsu")
        if ep.dist is not None and ep.dist.name == "hsu" and ep.name not in ESSENTIAL
    )


#: every unit here needs a launcher and nothing else
SLEEPER: dict[str, Any] = {
    "units": {"work": {"kind": "managed", "command": ["sleep", "60"], "start": "at-start"}}
}
ROUTED: dict[str, Any] = {
    "units": {"echo": {"command": [sys.executable, "-m", "hsu_echo"], "interfaces": ["x.v1.X"]}}
}

#: blocked plugin -> (a deployment that needs what it provides, the line expected)
NEEDS: dict[str, tuple[dict[str, Any], str]] = {
    "subprocess": (
        SLEEPER,
        "units.work.launcher: unit 'work' needs a launcher: no enabled plugin registers a"
        " default launcher (blocked: no:subprocess); name one or enable its plugin",
    ),
    "balancers": (
        ROUTED,
        "units.echo.routing: unit 'echo' serves 'x.v1.X' and needs a balancer: no enabled"
        " plugin registers a default balancer (blocked: no:balancers); name one or enable"
        " its plugin",
    ),
    "breakers": (
        ROUTED,
        "units.echo.routing: unit 'echo' serves 'x.v1.X' and needs a breaker: no enabled"
        " plugin registers a default breaker (blocked: no:breakers); name one or enable its plugin",
    ),
    "registry_memory": (
        ROUTED,
        "kernel.registry: routing to the units' interfaces needs a registry: no enabled"
        " plugin registers a default registry (blocked: no:registry_memory); name one or"
        " enable its plugin",
    ),
    "idle": (
        {"units": {"work": {**SLEEPER["units"]["work"], "idle_timeout": 5}}},
        "units.work.idle_timeout: unit 'work' sets idle_timeout, which needs a watcher: no"
        " enabled plugin registers a watcher for it (blocked: no:idle); enable its plugin",
    ),
    "limits": (
        {"units": {"work": {**SLEEPER["units"]["work"], "limits": {"rss_mb": 100}}}},
        "units.work.limits: unit 'work' sets limits, which needs a watcher: no enabled"
        " plugin registers a watcher for it (blocked: no:limits); enable its plugin",
    ),
    "probes": (
        {"units": {"far": {"kind": "unmanaged", "address": "127.0.0.1:1"}}},
        "units.far.health: unit 'far' (found by address, with no health probe) needs a"
        " probe: no enabled plugin registers a default probe (blocked: no:probes); name one or"
        " enable its plugin",
    ),
}


def test_the_built_in_defaults_are_the_hsu_distributions_entry_points() -> None:
    """The kernel names no default plugin: pyproject.toml's entry points are them."""
    pm = PluginManager.load(env={}, autoload=False)
    loaded = sorted(i.name for i in pm.infos() if i.source == "default")
    assert loaded == _builtin_defaults()
    assert {k: pm.default(k) for k in ("launcher", "probe", "balancer", "breaker", "registry")} == {
        "launcher": "subprocess",
        "probe": "grpc",
        "balancer": "round_robin",
        "breaker": "consecutive",
        "registry": "memory",
    }


def test_each_default_plugin_that_provides_something_is_covered_here() -> None:
    # the auth plugins (docs/auth.md): a deployment names them, there is no default
    auth = {"auth", "token", "rbac", "mtls", "peercred"}
    # systemd acts only under a service manager ($NOTIFY_SOCKET; docs/systemd.md);
    # the kernel runs without a storage (it then keeps no instance records);
    # exporters (docs/observability.md): a deployment names them, no default;
    # the kernel runs without a cache (it then keeps no replies; docs/cache.md);
    # without a placement every on-demand start is on the kernel asked
    others = {"file", "env", "overrides", "gateway", "systemd", "sqlite", "prometheus",
              "memory_cache", "placement"}  # fmt: skip
    assert set(NEEDS) | others | auth == set(_builtin_defaults())


@pytest.mark.parametrize("blocked", sorted(NEEDS))
def test_a_deployment_that_needs_a_blocked_default_gets_one_line(blocked: str) -> None:
    raw, line = NEEDS[blocked]
    with pytest.raises(ConfigError) as info:
        build_kernel(raw, names=[f"no:{blocked}"])
    assert info.value.problems == [f"<test>: {line}"]


@pytest.mark.parametrize(
    "blocked",
    [
        *sorted(set(NEEDS) - {"subprocess"}),
        "env",
        "overrides",
        "gateway",
        "sqlite",
        "memory_cache",
        "placement",
    ],
)
async def test_a_deployment_that_does_not_need_a_blocked_default_runs(
    blocked: str, tmp_path: Path
) -> None:
    kernel = build_kernel(SLEEPER, names=[f"no:{blocked}"], base_dir=str(tmp_path))
    assert not kernel.plugins.is_active(blocked)
    await kernel.start()
    try:
        [inst] = kernel.instances.values()
        assert inst.state == "ready" and inst.pid > 0
    finally:
        await kernel.stop("test finished")


async def test_without_the_default_launcher_a_unit_that_names_its_own_runs(
    tmp_path: Path,
) -> None:
    """no:subprocess: a deployment whose units name a launcher from another plugin."""
    from hsu_plugins.launch.subprocess import SubprocessLauncher

    class Mine:
        @staticmethod
        @__import__("hsu").hookimpl
        def hsu_register_launchers(register: Any) -> None:
            register("mine", SubprocessLauncher())

    raw = {"units": {"work": {**SLEEPER["units"]["work"], "launcher": "mine"}}}
    kernel: Kernel = build_kernel(
        raw, names=["no:subprocess"], plugins=[Mine], base_dir=str(tmp_path)
    )
    assert kernel.plugins.default("launcher") is None
    await kernel.start()
    try:
        [inst] = kernel.instances.values()
        assert inst.state == "ready"
    finally:
        await kernel.stop("test finished")


def test_a_routed_unit_gets_the_declared_defaults_filled_in() -> None:
    kernel = build_kernel(ROUTED)
    routing = kernel.deployment.units["echo"].routing
    assert (routing.balancer, routing.breaker) == ("round_robin", "consecutive")
    assert kernel.deployment.units["echo"].launcher == "subprocess"
    assert kernel.kernel_settings.registry == "memory"


def test_a_deployment_file_with_no_source_that_reads_files_is_an_error(tmp_path: Path) -> None:
    path = write_deployment(
        tmp_path / "deploy.yaml", "units:\n  work: {kind: managed, command: [sleep, '1']}\n"
    )
    ok = run_hsu("config", "validate", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "1 unit" in ok.stdout
    out = run_hsu("config", "validate", str(path), "-p", "no:file")
    assert out.returncode != 0
    assert (
        f"{path}: no enabled config source reads deployment files"
        " (sources: env, overrides; blocked: no:file)" in out.stderr
    )
    assert "0 units" not in out.stdout


def test_overrides_with_no_source_that_reads_them_are_an_error(tmp_path: Path) -> None:
    path = write_deployment(
        tmp_path / "deploy.yaml", "units:\n  work: {kind: managed, command: [sleep, '1']}\n"
    )
    out = run_hsu(
        "config", "validate", str(path), "--set", "units.work.max_instances=2", "-p", "no:overrides"
    )
    assert out.returncode != 0
    assert "--set overrides (sources: env, file; blocked: no:overrides)" in out.stderr


def test_a_second_default_of_one_kind_is_a_conflict_naming_both(hsu_plugin_manager: Any) -> None:
    from hsu.errors import ConflictError

    class Other:
        @staticmethod
        @__import__("hsu").hookimpl
        def hsu_register_balancers(register: Any) -> None:
            register("other", object(), default=True)

    with pytest.raises(ConflictError) as info:
        hsu_plugin_manager.register(Other, "other")
    assert "the default balancer is 'round_robin' from plugin 'balancers'" in str(info.value)
    assert "'other' from plugin 'other'" in str(info.value)
    assert hsu_plugin_manager.default("balancer") == "round_robin"
    assert "other" not in hsu_plugin_manager.balancer_names()


def test_hsu_plugins_lists_what_each_plugin_provides() -> None:
    out = run_hsu("plugins", "--json")
    assert out.returncode == 0, out.stderr
    import json

    provides = {p["name"]: p["provides"] for p in json.loads(out.stdout)}
    assert provides["subprocess"] == {"launcher": ["subprocess*"]}
    assert provides["registry_memory"] == {"registry": ["memory*"]}
    assert provides["sqlite"] == {"settings section": ["sqlite"], "storage": ["sqlite*"]}
    assert provides["memory_cache"] == {"settings section": ["memory_cache"], "cache": ["memory*"]}
    assert "round_robin*" in provides["balancers"]["balancer"]
    assert provides["kernel"] == {"settings section": ["cache", "kernel", "storage"]}
    text = run_hsu("plugins").stdout
    assert "launcher: subprocess*" in text
