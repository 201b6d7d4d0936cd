import asyncio
import types

import attrs
import pluggy
import pytest
from loguru import logger

import hsu
from hsu._kernel.plugins import PluginManager, split_plugin_list
from hsu.errors import ConflictError, PluginError, PluginLoadError


def test_builtins_load_in_order_and_are_active(hsu_plugin_manager):
    infos = hsu_plugin_manager.infos()
    assert [(i.name, i.source, i.status, i.distribution) for i in infos] == [
        ("kernel", "essential", "active", "hsu"),
        ("auth", "default", "active", "hsu"),
        ("balancers", "default", "active", "hsu"),
        ("breakers", "default", "active", "hsu"),
        ("env", "default", "active", "hsu"),
        ("file", "default", "active", "hsu"),
        ("gateway", "default", "active", "hsu"),
        ("idle", "default", "active", "hsu"),
        ("limits", "default", "active", "hsu"),
        ("memory_cache", "default", "active", "hsu"),
        ("mtls", "default", "active", "hsu"),
        ("overrides", "default", "active", "hsu"),
        ("peercred", "default", "active", "hsu"),
        ("placement", "default", "active", "hsu"),
        ("probes", "default", "active", "hsu"),
        ("prometheus", "default", "active", "hsu"),
        ("rbac", "default", "active", "hsu"),
        ("registry_memory", "default", "active", "hsu"),
        ("sqlite", "default", "active", "hsu"),
        ("subprocess", "default", "active", "hsu"),
        ("systemd", "default", "active", "hsu"),
        ("token", "default", "active", "hsu"),
    ]
    assert sorted(hsu_plugin_manager.config_sources()) == ["env", "file", "overrides"]
    assert hsu_plugin_manager.launcher_names() == ["subprocess"]
    assert hsu_plugin_manager.registry_names() == ["memory"]
    assert hsu_plugin_manager.breaker_names() == ["consecutive", "none", "ratio"]
    assert "p2c" in hsu_plugin_manager.balancer_names()
    assert "kernel" in hsu_plugin_manager.settings_classes()


def test_split_plugin_list_handles_commas_blocks_and_duplicates():
    names, blocked = split_plugin_list(["a, b", "no:c", "a", "", " no:d ,e"])
    assert names == ["a", "b", "e"]
    assert blocked == {"c", "d"}


def test_essential_plugins_cannot_be_blocked():
    with pytest.raises(PluginError, match="essential and cannot be blocked"):
        PluginManager.load(["no:kernel"], env={}, autoload=False)


def test_default_plugins_can_be_blocked():
    pm = PluginManager.load(["no:subprocess"], env={}, autoload=False)
    assert pm.launcher_names() == []
    assert [(i.name, i.status) for i in pm.infos() if i.name == "subprocess"] == [
        ("subprocess", "blocked")
    ]


def test_hsu_plugins_env_comes_first_and_blocks_too():
    pm = PluginManager.load([], env={"HSU_PLUGINS": "no:subprocess"}, autoload=False)
    assert not pm.is_active("subprocess")


def test_unknown_hook_is_rejected_and_nothing_is_registered(hsu_plugin_manager):
    class Typo:
        @hsu.hookimpl
        def hsu_kernel_strated(self, kernel):
            pass

    with pytest.raises(PluginError, match="implements unknown hook 'hsu_kernel_strated'"):
        hsu_plugin_manager.register(Typo(), "typo")
    assert not hsu_plugin_manager.pm.has_plugin("typo")
    assert "typo" not in [i.name for i in hsu_plugin_manager.infos()]


MODULE_PLUGIN = """
import hsu
from collections import OrderedDict
from hsu.ports import LaunchSpec

CONSTANT = 3
launcher = object()


def helper():
    pass


@hsu.hookimpl
def hsu_register_launchers(register):
    register("from_a_module", launcher)


@hsu.hookimpl
def hsu_kernel_started(kernel):
    pass
"""


def test_a_module_plugin_registers_its_hooks_and_only_them(hsu_plugin_manager):
    """A module is registered through a quicker lookup of its names (only
    functions can be hooks): its hooks are found, its imports, classes and
    constants are not."""
    module = types.ModuleType("hsu_test_module_plugin")
    exec(MODULE_PLUGIN, module.__dict__)
    hsu_plugin_manager.register(module, "from_module")
    info = next(i for i in hsu_plugin_manager.infos() if i.name == "from_module")
    assert info.hooks == ["hsu_kernel_started", "hsu_register_launchers"]
    assert info.provides == {"launcher": ["from_a_module"]}
    assert hsu_plugin_manager.launcher("from_a_module") is module.launcher

    typo = types.ModuleType("hsu_test_typo_plugin")
    exec(MODULE_PLUGIN.replace("hsu_kernel_started", "hsu_kernel_strated"), typo.__dict__)
    with pytest.raises(PluginError, match="implements unknown hook 'hsu_kernel_strated'"):
        hsu_plugin_manager.register(typo, "typo_module")
    assert not hsu_plugin_manager.pm.has_plugin("typo_module")


def test_hookimpl_with_arguments_the_spec_lacks_is_rejected(hsu_plugin_manager):
    class Wrong:
        @hsu.hookimpl
        def hsu_kernel_started(self, kernel, extra):
            pass

    with pytest.raises(pluggy.PluginValidationError):
        hsu_plugin_manager.register(Wrong(), "wrong")


def test_settings_clash_names_both_plugins_and_rolls_back(hsu_plugin_manager):
    @attrs.frozen
    class S:
        x: int = 0

    class A:
        @hsu.hookimpl
        def hsu_register_settings(self, register):
            register("shared", S)

    class B:
        @hsu.hookimpl
        def hsu_register_settings(self, register):
            register("shared", S)

    hsu_plugin_manager.register(A(), "a")
    with pytest.raises(ConflictError) as info:
        hsu_plugin_manager.register(B(), "b")
    assert "settings section 'shared' is registered by plugin 'a' and by plugin 'b'" in str(
        info.value
    )
    assert not hsu_plugin_manager.pm.has_plugin("b")
    hsu_plugin_manager.unregister("a")
    assert "shared" not in hsu_plugin_manager.settings_classes()


def test_launcher_clash_names_the_builtin_and_its_distribution(hsu_plugin_manager):
    class Mine:
        @hsu.hookimpl
        def hsu_register_launchers(self, register):
            register("subprocess", object())

    with pytest.raises(ConflictError, match=r"plugin 'subprocess' \(hsu .*\) and by plugin 'mine'"):
        hsu_plugin_manager.register(Mine(), "mine")


def test_unknown_launcher_lists_the_registered_ones(hsu_plugin_manager):
    with pytest.raises(PluginError, match=r"no launcher named 'k8s' \(registered: subprocess\)"):
        hsu_plugin_manager.launcher("k8s")


def test_explicit_module_that_fails_to_import_is_a_hard_error_with_the_cause(tmp_path, monkeypatch):
    (tmp_path / "hsu_broken_mod.py").write_text("raise RuntimeError('kaboom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError) as info:
        PluginManager.load(["hsu_broken_mod"], env={}, autoload=False)
    assert "Error importing plugin 'hsu_broken_mod'" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "kaboom at import" in str(info.value.__cause__)


def test_explicit_name_that_is_nothing_says_what_is_installed():
    with pytest.raises(PluginError, match=r"unknown plugin 'nope_nothing'.*installed: .*kernel"):
        PluginManager.load(["nope_nothing"], env={}, autoload=False)


def test_explicit_module_plugin_is_loaded_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "hsu_mod_ok.py").write_text(
        "import hsu\n@hsu.hookimpl\ndef hsu_kernel_started(kernel):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = PluginManager.load(["hsu_mod_ok"], env={}, autoload=False)
    info = {i.name: i for i in pm.infos()}["hsu_mod_ok"]
    assert (info.status, info.source, info.hooks) == ("active", "explicit", ["hsu_kernel_started"])


async def test_call_each_awaits_each_result_in_pluggy_order(hsu_plugin_manager):
    calls = []

    class First:
        @hsu.hookimpl
        def hsu_kernel_starting(self, kernel):
            async def later():
                await asyncio.sleep(0.01)
                calls.append(("first", kernel))

            return later()

    class Second:
        @hsu.hookimpl(tryfirst=True)
        def hsu_kernel_starting(self, kernel):
            calls.append(("second", kernel))

    hsu_plugin_manager.register(First(), "first")
    hsu_plugin_manager.register(Second(), "second")
    await hsu_plugin_manager.call_each("hsu_kernel_starting", kernel="k")
    assert calls == [("second", "k"), ("first", "k")]


async def test_call_each_on_the_stop_path_logs_and_goes_on(hsu_plugin_manager):
    calls = []

    class Bad:
        @hsu.hookimpl
        def hsu_kernel_stopped(self, kernel):
            raise RuntimeError("bad plugin")

    class Good:
        @hsu.hookimpl(trylast=True)
        def hsu_kernel_stopped(self, kernel):
            calls.append("good")

    hsu_plugin_manager.register(Good(), "good")
    hsu_plugin_manager.register(Bad(), "bad")
    with pytest.raises(RuntimeError):
        await hsu_plugin_manager.call_each("hsu_kernel_stopped", kernel=None)
    assert calls == []
    await hsu_plugin_manager.call_each("hsu_kernel_stopped", stop_on_error=False, kernel=None)
    assert calls == ["good"]


def test_tracing_logs_hook_calls():
    pm = PluginManager.load([], env={"HSU_TRACE_PLUGINS": "1"}, autoload=False)
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        pm.pm.hook.hsu_endpoint_removed(kernel=None, endpoint=None)
    finally:
        logger.remove(sink)
    assert any("hook hsu_endpoint_removed" in line for line in lines)


# -- real installed distributions (see conftest.plugin_dists) --------------


def test_entry_points_autoload_the_good_skip_the_broken_and_honour_no(plugin_dists, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dists))
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        pm = PluginManager.load(["no:blocked"], env={})
    finally:
        logger.remove(sink)
    infos = {i.name: i for i in pm.infos()}
    good = infos["good"]
    assert (good.status, good.source, good.distribution, good.version) == (
        "active",
        "entrypoint",
        "hsu-plugin-good",
        "1.0",
    )
    assert good.hooks == ["hsu_kernel_started", "hsu_kernel_stopped", "hsu_register_settings"]
    assert (infos["blocked"].status, infos["blocked"].distribution) == (
        "blocked",
        "hsu-plugin-blocked",
    )
    assert not pm.pm.has_plugin("blocked")
    broken = infos["broken"]
    assert broken.status == "failed"
    assert "Error importing plugin 'broken' from hsu-plugin-broken 1.0" in broken.error
    warning = "\n".join(lines)
    assert "hsu_plugin_broken_missing_dependency" in warning
    assert "-p no:broken" in warning and "HSU_DISABLE_PLUGIN_AUTOLOAD=1" in warning


def test_broken_plugin_named_explicitly_is_a_hard_error(plugin_dists, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dists))
    with pytest.raises(PluginLoadError) as info:
        PluginManager.load(["broken"], env={}, autoload=False)
    assert str(info.value).startswith(
        "Error importing plugin 'broken' from hsu-plugin-broken 1.0: ModuleNotFoundError"
    )
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_autoload_off_loads_only_what_is_named(plugin_dists, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dists))
    pm = PluginManager.load(["good"], env={"HSU_DISABLE_PLUGIN_AUTOLOAD": "1"})
    names = {i.name: i.source for i in pm.infos() if i.source != "default"}
    assert names == {"kernel": "essential", "good": "explicit"}
