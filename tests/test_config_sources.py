"""Config sources as plugins: layering, origins, secrets, `hsu config show`."""

import json

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

import hsu
from conftest import run_hsu, write_deployment
from hsu._kernel.config import loader as config_loader
from hsu._kernel.config.sources import merge
from hsu._kernel.plugins import PluginManager
from hsu.config import env_layer, overrides_layer
from hsu.errors import ConfigError
from hsu.ports import Layer, Origin, SourceContext

BASE = """\
name: layered
kernel:
  drain_grace: 1
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    stop_grace: 4
    env:
      TOKEN: ${env:HSU_TEST_TOKEN}
"""


def load(tmp_path, text=BASE, overrides=(), env=None, name="d.yaml"):
    path = write_deployment(tmp_path / name, text)
    ctx = config_loader.context([path], overrides, {"HSU_TEST_TOKEN": "s3cret", **(env or {})})
    return path, *config_loader.validate(ctx)


def test_precedence_is_file_then_environment_then_set(tmp_path):
    env = {"HSU_UNITS__ECHO__STOP_GRACE": "6", "HSU_KERNEL__DRAIN_GRACE": "2"}
    path, d, settings = load(tmp_path, env=env, overrides=["units.echo.stop_grace=8"])
    assert d.units["echo"].stop_grace == 8  # --set beats env beats file
    assert settings["kernel"].drain_grace == 2  # env beats file
    assert d.units["echo"].startup_timeout == 30  # default
    assert d.origins[("units", "echo", "stop_grace")] == Origin("--set units.echo.stop_grace=8")
    assert d.origins[("kernel", "drain_grace")] == Origin("env HSU_KERNEL__DRAIN_GRACE")
    assert d.origins[("units", "echo", "command")] == Origin(str(path), 6)


def test_errors_carry_the_line_or_the_variable_that_set_the_value(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env={"HSU_KERNEL__DRAIN_GRACE": "soon"})
    assert info.value.problems == [
        "env HSU_KERNEL__DRAIN_GRACE: kernel.drain_grace: expected seconds or a duration"
        " (500ms, 5s, 2m), got 'soon'"
    ]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, overrides=["units.echo.cwd=5"])
    assert info.value.problems == [
        "--set units.echo.cwd=5: units.echo.cwd: expected a string, got 5"
    ]


def test_toml_and_json_files_load_too(tmp_path):
    as_dict = yaml.safe_load(BASE.replace("${env:HSU_TEST_TOKEN}", "t"))
    toml = (
        'name = "layered"\n[units.echo]\ncommand = ["python", "-m", "hsu_echo"]\n'
        'interfaces = ["hsu.echo.v1.Echo"]\nstop_grace = "x"\n'
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, name="d.toml")
    assert info.value.problems == [
        f"{tmp_path / 'd.toml'}: units.echo.stop_grace: expected seconds or a duration"
        f" (500ms, 5s, 2m), got 'x'"
    ]
    _, d, _ = load(tmp_path, json.dumps(as_dict, indent=1), name="d.json")
    assert d.units["echo"].stop_grace == 4


def test_secret_references_resolve_and_are_never_shown(tmp_path):
    (tmp_path / "pw").write_text("from-a-file\n")
    _, d, settings = load(tmp_path)
    assert d.units["echo"].env["TOKEN"] == "s3cret"
    rows = config_loader.show(d, settings)
    shown = config_loader.format_rows(rows)
    assert "s3cret" not in shown
    assert "units.echo.env.TOKEN = ${env:HSU_TEST_TOKEN}" in shown
    assert "(secret reference, value not shown)" in shown
    assert d.secrets.redact("--token s3cret") == "--token ***"
    # a file reference, relative to the deployment's folder
    text = BASE.replace("${env:HSU_TEST_TOKEN}", "${file:pw}")
    _, d, _ = load(tmp_path, text)
    assert d.units["echo"].env["TOKEN"] == "from-a-file"


def test_a_missing_secret_is_an_error_naming_where_it_was_asked_for(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", BASE)
    with pytest.raises(ConfigError) as info:
        config_loader.validate(config_loader.context([path], env={}))
    assert info.value.problems == [
        f"{path}:10: units.echo.env.TOKEN: ${{env:HSU_TEST_TOKEN}}: HSU_TEST_TOKEN is not set"
    ]


def test_double_dollar_is_a_literal_dollar(tmp_path):
    _, d, _ = load(tmp_path, BASE.replace("${env:HSU_TEST_TOKEN}", "'$${env:NOT_A_REF}'"))
    assert d.units["echo"].env["TOKEN"] == "${env:NOT_A_REF}"
    assert not d.references
    assert not d.secrets


def test_config_show_cli_lists_each_value_with_its_source(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", BASE.replace("${env:HSU_TEST_TOKEN}", "t"))
    out = run_hsu("config", "show", str(path), "--json", "--set", "units.echo.stop_grace=9")
    assert out.returncode == 0, out.stderr
    rows = {r["path"]: r for r in json.loads(out.stdout)}
    assert rows["units.echo.stop_grace"]["value"] == 9
    assert rows["units.echo.stop_grace"]["source"] == "--set units.echo.stop_grace=9"
    assert rows["units.echo.interfaces"]["source"] == f"{path}:7"
    assert rows["units.echo.startup_timeout"] == {
        "path": "units.echo.startup_timeout",
        "value": 30.0,
        "source": "default",
        "secret": False,
    }
    assert rows["kernel.address"]["value"] == "127.0.0.1:7420"


def test_config_schema_cli_prints_a_json_schema_with_plugin_sections():
    out = run_hsu("config", "schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["additionalProperties"] is False
    assert "kernel" in schema["properties"]
    assert "command" in schema["properties"]["units"]["additionalProperties"]["properties"]


def test_env_and_overrides_layers():
    layer = env_layer({"HSU_UNITS__ECHO__ARGS": "[a, b]", "HSU_PLUGINS": "x", "OTHER__X": "1"})
    assert layer.data == {"units": {"echo": {"args": ["a", "b"]}}}
    with pytest.raises(ConfigError, match="expected PATH=VALUE"):
        overrides_layer(("units.echo",))
    merged = merge(
        [
            Layer(
                {"a": {"b": 1, "c": 2}}, {("a", "b"): Origin("f", 1), ("a", "c"): Origin("f", 2)}
            ),
            Layer({"a": {"b": 3}}, {("a", "b"): Origin("env")}),
        ]
    )
    assert merged.data == {"a": {"b": 3, "c": 2}}
    assert merged.origins[("a", "b")] == Origin("env")
    assert merged.origins[("a", "c")] == Origin("f", 2)


def test_a_plugin_can_add_a_config_source(tmp_path):
    class Fixed:
        priority = 25

        def load(self, ctx):
            return [
                Layer(
                    {"units": {"echo": {"stop_grace": 2}}},
                    {("units", "echo", "stop_grace"): Origin("fixed")},
                )
            ]

        def watch(self, ctx, on_change):
            return None

    class Plugin:
        @hsu.hookimpl
        def hsu_register_config_sources(self, register):
            register("fixed", Fixed())

    pm = PluginManager.load([], env={}, autoload=False)
    pm.register(Plugin(), "fixed-plugin")
    path = write_deployment(tmp_path / "d.yaml", BASE.replace("${env:HSU_TEST_TOKEN}", "t"))
    d = config_loader.read_config(pm, SourceContext(files=(path,), env={}))
    assert d.units["echo"].stop_grace == 2
    assert d.origins[("units", "echo", "stop_grace")] == Origin("fixed")


# -- property: the loader returns a config or a ConfigError, nothing else ------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = ["command", "interfaces", "env", "cwd", "start", "launcher", "startup_timeout", "stop_grace"]
unit = st.dictionaries(st.sampled_from([*KEYS, "comand", "x"]), values, max_size=6)
deployments = st.fixed_dictionaries(
    {},
    optional={
        "name": values,
        "plugins": st.one_of(values, st.just([])),
        "units": st.one_of(values, st.dictionaries(st.text(max_size=6), unit, max_size=3)),
        "kernel": st.one_of(
            values,
            st.dictionaries(st.sampled_from(["address", "drain_grace", "log_tail", "bad"]), values),
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=deployments)
def test_random_deployments_load_or_raise_config_error_with_a_path(raw):
    pm = PluginManager.load([], env={}, autoload=False)
    try:
        d = hsu.deployment_from_dict(raw, source="r.yaml")
        hsu.Kernel(d, pm)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("r.yaml") for p in exc.problems)
    except hsu.PluginError:
        pass  # a `plugins:` entry naming nothing: a clear error of its own


@settings(max_examples=200, deadline=None)
@given(
    path=st.lists(
        st.sampled_from(["units", "echo", "command", "stop_grace", "kernel", "x"]),
        min_size=1,
        max_size=4,
    ),
    value=values,
)
def test_mutating_a_valid_deployment_never_raises_anything_else(path, value):
    raw = yaml.safe_load(BASE.replace("${env:HSU_TEST_TOKEN}", "t"))
    node = raw
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value
    pm = PluginManager.load([], env={}, autoload=False)
    try:
        hsu.Kernel(hsu.deployment_from_dict(raw, source="m.yaml"), pm)
    except ConfigError as exc:
        assert all(p.startswith("m.yaml") for p in exc.problems)


# -- a reload reuses what did not change -------------------------------------


def many_units(n: int, changed: dict[int, str] | None = None) -> str:
    """``n`` managed units of one instance each; ``changed`` adds lines to some."""
    out = ["name: many", "units:"]
    for i in range(n):
        out += [
            f"  u{i}:",
            "    kind: managed",
            "    command: [sleep, '600']",
            "    start: at-start",
            "    min_instances: 1",
        ]
        out += (changed or {}).get(i, "").splitlines()
    return "\n".join(out) + "\n"


def read(path, previous=None, env=None):
    ctx = config_loader.context([path], env=env or {})
    pm = PluginManager.load([], env={}, autoload=False)
    return config_loader.read_config(pm, ctx, previous=previous)


def test_a_typo_deep_in_a_big_file_says_its_line_on_a_first_read_and_a_reload(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", many_units(1000))
    good = read(path)
    assert not good.problems and len(good.units) == 1000
    write_deployment(path, many_units(1000, {699: "    stop_grase: 3"}))
    line = 2 + 699 * 5 + 5 + 1  # the header, 699 units of 5 lines, u699's own 5, then it
    assert path.read_text().splitlines()[line - 1] == "    stop_grase: 3"
    for previous in (None, good):
        assert read(path, previous).problems == (
            f"{path}:{line}: units.u699.stop_grase: unknown key; did you mean 'stop_grace'?",
        )


def test_a_reload_reuses_a_unit_only_when_its_mapping_is_the_same_types_included(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", many_units(3))
    first = read(path)
    write_deployment(path, many_units(3, {1: "    stop_grace: 3"}))
    second = read(path, first)
    assert second.units["u0"] is first.units["u0"] and second.units["u2"] is first.units["u2"]
    assert second.units["u1"].stop_grace == 3.0
    # equal in Python, not the same value: true is not a number, 1.0 is a float
    write_deployment(path, many_units(3, {1: "    stop_grace: 3", 2: "    max_instances: 1"}))
    third = read(path, second)
    write_deployment(path, many_units(3, {1: "    stop_grace: 3", 2: "    max_instances: true"}))
    assert read(path, third).problems == (
        f"{path}:19: units.u2.max_instances: expected int, got True",
    )


def test_a_reload_sees_a_change_a_unit_gets_from_outside_its_own_mapping(tmp_path):
    """A secret file, a YAML anchor in another unit, an env_file: none of
    them is in the unit's mapping as written, each changes what it runs."""
    (tmp_path / "secret.txt").write_text("first-secret")
    (tmp_path / "app.env").write_text("GREETING=hello\n")
    text = """\
name: outside
units:
  a: &base
    kind: managed
    command: [sleep, '600']
    env: {TOKEN: '${file:secret.txt}'}
    stop_grace: 2
  b:
    <<: *base
    env_file: app.env
"""
    path = write_deployment(tmp_path / "d.yaml", text)
    first = read(path)
    assert first.units["a"].env["TOKEN"] == "first-secret"
    same = read(path, first)
    assert same.units["a"] is first.units["a"] and same.units["b"] is first.units["b"]

    (tmp_path / "secret.txt").write_text("second-secret")
    second = read(path, first)
    assert second.units["a"].env["TOKEN"] == "second-secret"
    assert second.units["b"].env["TOKEN"] == "second-secret"

    write_deployment(path, text.replace("stop_grace: 2", "stop_grace: 7"))
    third = read(path, second)
    assert third.units["b"].stop_grace == 7.0  # from a's anchor

    (tmp_path / "app.env").write_text("GREETING=changed\n")
    fourth = read(path, third)
    assert fourth.units["b"] is third.units["b"]  # the same mapping: reused ...
    assert fourth.env_files["b"] != third.env_files["b"]  # ... its file read again
