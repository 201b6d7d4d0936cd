"""The `hsu` command's own behaviour on good and bad input."""

import json

import pytest

from conftest import ROOT, hsu_env, run_hsu, write_deployment

pytestmark = pytest.mark.integration


def test_plugins_json_lists_builtins_with_distribution_and_hooks():
    out = run_hsu("plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(p["name"], p["source"], p["status"]) for p in data] == [
        ("kernel", "essential", "active"),
        ("auth", "default", "active"),
        ("balancers", "default", "active"),
        ("breakers", "default", "active"),
        ("env", "default", "active"),
        ("file", "default", "active"),
        ("gateway", "default", "active"),
        ("idle", "default", "active"),
        ("limits", "default", "active"),
        ("memory_cache", "default", "active"),
        ("mtls", "default", "active"),
        ("overrides", "default", "active"),
        ("peercred", "default", "active"),
        ("placement", "default", "active"),
        ("probes", "default", "active"),
        ("prometheus", "default", "active"),
        ("rbac", "default", "active"),
        ("registry_memory", "default", "active"),
        ("sqlite", "default", "active"),
        ("subprocess", "default", "active"),
        ("systemd", "default", "active"),
        ("token", "default", "active"),
    ]
    assert data[-3]["hooks"] == ["hsu_register_launchers"]  # subprocess
    assert data[0]["distribution"] == "hsu"


def test_plugins_table_shows_blocked_and_failed(plugin_dists):
    env = hsu_env(plugin_dists, HSU_DISABLE_PLUGIN_AUTOLOAD="")
    out = run_hsu("plugins", "-p", "no:blocked", env=env)
    assert out.returncode == 0, out.stderr
    rows = {
        line.split()[0]: line.split()[1:4]
        for line in out.stdout.splitlines()
        if not line.startswith(" ")
    }
    assert rows["good"] == ["active", "entrypoint", "hsu-plugin-good"]
    assert rows["blocked"] == ["blocked", "blocked", "hsu-plugin-blocked"]
    assert rows["broken"] == ["failed", "entrypoint", "hsu-plugin-broken"]
    assert "hsu_plugin_broken_missing_dependency" in out.stderr  # the warning, with the cause


def test_a_broken_plugin_named_with_p_fails_with_its_name_dist_and_version(plugin_dists):
    out = run_hsu("plugins", "-p", "broken", env=hsu_env(plugin_dists))
    assert out.returncode == 1
    assert out.stderr.startswith(
        "hsu: error: Error importing plugin 'broken' from hsu-plugin-broken 1.0:"
        " ModuleNotFoundError: No module named 'hsu_plugin_broken_missing_dependency'"
    )
    assert "Traceback" not in out.stderr


def test_config_mistakes_are_listed_without_a_traceback(tmp_path):
    d = write_deployment(
        tmp_path / "bad.yaml",
        "units:\n  echo:\n    comand: [x]\n    stop_grace: three\nkernal: {}\n",
    )
    for command in ("run", "config validate"):
        out = run_hsu(*command.split(), str(d))
        assert out.returncode == 1
        assert "Traceback" not in out.stderr
        assert f"{d}:3: units.echo.comand: unknown key; did you mean 'command'?" in out.stderr
        assert (
            f"{d}:4: units.echo.stop_grace: expected seconds or a duration"
            f" (500ms, 5s, 2m), got 'three'" in out.stderr
        )
        assert f"{d}:2: units.echo.command: required key missing" in out.stderr


def test_unknown_section_is_caught_after_plugins_load(tmp_path):
    d = write_deployment(tmp_path / "d.yaml", "kernal:\n  address: 127.0.0.1:0\n")
    out = run_hsu("config", "validate", str(d))
    assert out.returncode == 1
    assert (
        f"{d}:1: kernal: no enabled plugin has a settings section of this name;"
        " did you mean 'kernel'?"
    ) in out.stderr


def test_validate_accepts_the_demo():
    out = run_hsu("config", "validate", str(ROOT / "contrib" / "hsu-echo" / "deployment.yaml"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": ok (1 units)")


def test_status_and_ping_without_a_kernel_say_so(tmp_path):
    address = f"unix:{tmp_path / 'nobody.sock'}"
    for command in ("status", "ping"):
        out = run_hsu(command, "--address", address, "--timeout", "2")
        assert out.returncode == 5  # kernel unreachable (docs/cli.md)
        assert f"hsu: error: no kernel answers at {address}" in out.stderr


def test_help_lists_every_command():
    out = run_hsu("--help")
    for command in ("run", "plugins", "status", "ping", "config", "endpoints"):
        assert command in out.stdout
