import sys

import attrs
import pytest

from hsu._kernel.config.model import (
    Deployment,
    deployment_from_dict,
    load_deployment,
    structure_options,
    structure_sections,
)
from hsu._kernel.kernel import Kernel
from hsu._kernel.plugins import PluginManager
from hsu.errors import ConfigError, HsuError
from hsu.testing import build_kernel


def problems(raw, **kw):
    with pytest.raises(ConfigError) as info:
        deployment_from_dict(raw, source="d.yaml", **kw)
    return info.value.problems


def test_every_problem_is_reported_at_once_with_its_path_and_source():
    found = problems(
        {
            "plugins": "oops",
            "units": {
                "echo": {"command": 3, "interfcaes": [], "startup_timeout": "soon"},
                "other": {},
            },
        }
    )
    assert "d.yaml: plugins: expected a list of strings, got 'oops'" in found
    assert "d.yaml: units.echo.command: expected a string or a list of strings, got 3" in found
    assert (
        "d.yaml: units.echo.startup_timeout: expected seconds or a duration"
        " (500ms, 5s, 2m), got 'soon'" in found
    )
    assert "d.yaml: units.echo.interfcaes: unknown key; did you mean 'interfaces'?" in found
    assert "d.yaml: units.other.command: required key missing" in found
    assert len(found) == 5


def test_a_command_string_is_split_like_a_shell_and_python_means_this_interpreter():
    d = deployment_from_dict({"units": {"e": {"command": "python -m 'a b'"}}})
    assert d.units["e"].command == ("python", "-m", "a b")
    from hsu._kernel.supervision.supervisor import UnitSupervisor

    kernel = build_kernel({"units": {"e": {"command": "python -m x"}}})
    assert UnitSupervisor(kernel, "e", kernel.unit("e"))._argv()[0] == sys.executable


def test_strict_types_reject_bools_for_numbers_and_numbers_for_strings():
    found = problems({"units": {"e": {"command": ["x"], "stop_grace": True, "cwd": 5}}})
    assert any(
        "units.e.stop_grace: expected seconds or a duration (500ms, 5s, 2m), got True" in p
        for p in found
    )
    assert any("units.e.cwd" in p for p in found)


def test_validators_report_the_field():
    found = problems({"units": {"e": {"command": ["x"], "startup_timeout": 0}}})
    assert len(found) == 1 and "units.e" in found[0] and "startup_timeout" in found[0]


def test_unknown_plugin_section_suggests_the_closest_registered_one():
    @attrs.frozen
    class S:
        port: int = 1

    d = Deployment(name="x", sections={"kernal": {}, "mine": {"port": 2}}, source="d.yaml")
    with pytest.raises(ConfigError) as info:
        structure_sections(d, {"kernel": S, "mine": S})
    assert info.value.problems == [
        "d.yaml: kernal: no enabled plugin has a settings section of this name;"
        " did you mean 'kernel'?"
    ]
    ok = structure_sections(Deployment(name="x", sections={"mine": {"port": 2}}), {"mine": S})
    assert ok == {"mine": S(2)}


def test_load_deployment_reports_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_deployment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("units: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_deployment(bad)
    good = tmp_path / "svc.yaml"
    good.write_text("units:\n  a:\n    command: [x]\n")
    d = load_deployment(good)
    assert d.name == "svc" and d.base_dir == str(tmp_path) and d.source == str(good)


def test_a_unit_naming_an_unknown_launcher_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build_kernel({"units": {"e": {"command": ["x"], "launcher": "dokcer"}}})
    assert "units.e.launcher: no launcher named 'dokcer' (registered: subprocess)" in str(
        info.value
    )


# -- plugin options ------------------------------------------------------------------

BAD_OPTIONS = """\
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    health:
      probe: tcp
      options: {prot: 80}
    routing:
      balancer: ring_hash
      balancer_options:
        replicas: 0
        seed: "2"
      breaker_options: {failures: 0, cooldown: 10, max_cooldown: 5}
"""


def test_plugin_options_are_config_errors_with_the_file_line_and_path(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(BAD_OPTIONS)
    deployment = load_deployment(path)
    with pytest.raises(ConfigError) as info:
        Kernel(deployment, PluginManager.load([], env={}, autoload=False))
    assert sorted(info.value.problems) == [
        f"{path}:11: units.echo.routing.balancer_options.replicas: must be >= 1, got 0",
        f"{path}:12: units.echo.routing.balancer_options.seed: expected int, got '2'",
        f"{path}:13: units.echo.routing.breaker_options.failures: must be >= 1, got 0",
        f"{path}:13: units.echo.routing.breaker_options.max_cooldown:"
        " must be >= cooldown (10), got 5",
        f"{path}:7: units.echo.health.options.prot: unknown key; did you mean 'port'?",
    ]


def test_good_plugin_options_load_and_reach_the_plugin(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(
        BAD_OPTIONS.replace("prot: 80", "port: 80")
        .replace("replicas: 0", "replicas: 3")
        .replace('seed: "2"', "seed: 2")
        .replace("failures: 0", "failures: 2")
        .replace("max_cooldown: 5", "max_cooldown: 50")
    )
    pm = PluginManager.load([], env={}, autoload=False)
    kernel = Kernel(load_deployment(path), pm)
    health = kernel.unit("echo").health
    assert health is not None
    options = structure_options(pm.probe("tcp"), health.options, ("health", "options"))
    assert (options.port, options.host) == (80, None)


def test_a_routed_caller_structures_the_options_it_gets_over_the_kernel_api():
    """hsu.connect gets a unit's options as a mapping (JSON over the Kernel API)
    and builds its balancer and breakers with the kernel's own check."""
    from hsu.client.route import Policy, Route
    from hsu.kernel.v1 import kernel_pb2

    pm = PluginManager.load([], env={}, autoload=False)
    sent = Policy(
        unit="echo",
        balancer="ring_hash",
        balancer_options={"replicas": 3},
        breaker="ratio",
        breaker_options={"window": 4},
    )
    received = Policy.from_pb(sent.to_pb(kernel_pb2.RoutingPolicy))
    route = Route("hsu.echo.v1.Echo", received, pm)
    assert route.balancer._replicas == 3  # type: ignore[attr-defined]
    assert route.breaker("echo-1").window == 4  # type: ignore[attr-defined]
    bad = attrs.evolve(sent, balancer_options={"replicas": 0, "sed": 1})
    with pytest.raises(HsuError) as info:
        Route("hsu.echo.v1.Echo", bad, pm)
    assert str(info.value) == (
        "balancer 'ring_hash': routing.balancer_options.sed: unknown key; did you mean 'seed'?; "
        "balancer 'ring_hash': routing.balancer_options.replicas: must be >= 1, got 0"
    )


def test_on_demand_units_idle_out_after_five_minutes_unless_told_otherwise():
    """idle_timeout: unset means 300 s for an integrated unit started on
    demand, never for an at-start, singleton, managed or unmanaged one (a
    managed process does not report its calls in flight, so it would look
    idle to the kernel while in use); null and 0 turn it off;
    a negative one is an error naming the field."""
    cmd = {"command": ["true"]}
    units = deployment_from_dict(
        {
            "units": {
                "lazy": cmd,
                "eager": {**cmd, "start": "at-start"},
                "single": {**cmd, "placement": "singleton"},
                "off": {**cmd, "idle_timeout": None},
                "zero": {**cmd, "idle_timeout": 0},
                "short": {**cmd, "idle_timeout": "2m"},
                "eager_told": {**cmd, "start": "at-start", "idle_timeout": 300},
                "attached": {"kind": "unmanaged", "address": "127.0.0.1:1"},
                "plain": {**cmd, "kind": "managed"},
                "plain_told": {**cmd, "kind": "managed", "idle_timeout": "1m"},
            }
        },
        source="d.yaml",
    ).units
    assert {name: u.idle_after for name, u in units.items()} == {
        "lazy": 300.0,
        "eager": None,
        "single": None,
        "off": None,
        "zero": None,
        "short": 120.0,
        "eager_told": 300.0,
        "attached": None,
        "plain": None,
        "plain_told": 60.0,
    }
    with pytest.raises(ConfigError) as info:
        build_kernel({"units": {"lazy": {**cmd, "idle_timeout": -1}}})
    assert "units.lazy.idle_timeout: must be >= 0 (0: never), got -1.0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_kernel({"units": {"one": {**cmd, "placement": "singleton", "idle_timeout": 60}}})
    assert "units.one.idle_timeout: a 'placement: singleton' unit" in str(info.value)


def test_an_absent_section_types_as_cattrs_would_type_it_empty():
    """A section the deployment leaves out is made with ``cls()`` when every
    field has a default (no cattrs function generated at the kernel's start):
    for every section of the installed plugins (autoloaded, as ``hsu run``),
    the same value cattrs makes of ``{}``; a class that needs a value still
    says which key is missing."""
    from hsu._kernel.config.model import _all_defaults, converter

    classes = PluginManager.load([], env={}, autoload=True).settings_classes()
    assert len(classes) >= 10
    got = structure_sections(Deployment(name="x", sections={}), classes)
    fast = [name for name, cls in classes.items() if _all_defaults(cls)]
    assert len(fast) >= 10
    for name, cls in classes.items():
        assert got[name] == converter.structure({}, cls), name

    @attrs.frozen
    class Needs:
        port: int

    with pytest.raises(ConfigError) as info:
        structure_sections(Deployment(name="x", sections={}, source="d.yaml"), {"needs": Needs})
    assert info.value.problems == ["d.yaml: needs.port: required key missing"]
