"""The generated JSON Schema agrees with what the deployment loader accepts."""

import copy
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from hsu._kernel.config.model import (
    KernelSettings,
    StartMode,
    UnitSpec,
    deployment_from_dict,
    structure_sections,
)
from hsu._kernel.config.schema import attrs_schema, deployment_schema, plugin_choices
from hsu._kernel.plugins import PluginManager
from hsu.errors import ConfigError
from hsu.testing import build_kernel

jsonschema = pytest.importorskip("jsonschema")
hsu_echo_demo = pytest.importorskip("hsu_echo.demo")

DEMO = Path(__file__).parent.parent / "contrib" / "hsu-echo" / "deployment.yaml"
SECTIONS = {"kernel": KernelSettings, "echo-demo": hsu_echo_demo.Settings}


def demo_document() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text(encoding="utf-8"))


def errors(document: Any) -> list[str]:
    schema = deployment_schema(SECTIONS)
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_generated_schemas_are_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(deployment_schema(SECTIONS))
    jsonschema.Draft202012Validator.check_schema(attrs_schema(UnitSpec))


def test_unit_spec_schema_is_closed_and_requires_command():
    schema = attrs_schema(UnitSpec)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    # every field of UnitSpec is described, whatever fields it gains
    assert set(schema["properties"]) == {f.name for f in attrs.fields(UnitSpec)}
    # command is required, except of an unmanaged unit (attached, not started)
    check = jsonschema.Draft202012Validator(schema)
    assert not list(check.iter_errors({"command": "x"}))
    assert [e.message for e in check.iter_errors({})] == ["'command' is a required property"]
    assert not list(check.iter_errors({"kind": "unmanaged", "pidfile": "x.pid"}))


def test_field_types_map_to_json_types():
    props = attrs_schema(UnitSpec)["properties"]
    assert props["start"]["enum"] == [m.value for m in StartMode]
    assert props["start"]["default"] == "on-demand"
    assert props["interfaces"]["type"] == "array"
    assert props["interfaces"]["items"] == {"type": "string"}
    assert props["interfaces"]["default"] == []
    assert props["env"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert "default" not in props["env"]  # a factory, not a plain value
    assert props["cwd"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert props["cwd"]["default"] is None
    # a number of seconds, or a duration string (hsu.config.Seconds)
    timeout = props["startup_timeout"]["anyOf"]
    assert timeout[0] == {"type": "number"} and timeout[1]["type"] == "string"
    assert props["startup_timeout"]["exclusiveMinimum"] == 0
    command = props["command"]["anyOf"]
    assert {"type": "string", "minLength": 1} in command
    assert {"type": "array", "items": {"type": "string"}, "minItems": 1} in command


def test_metadata_schema_is_used_verbatim_and_nested_classes_recurse():
    class Color(enum.Enum):
        RED = 1
        BLUE = 2

    @attrs.frozen
    class Inner:
        level: int

    @attrs.frozen
    class Outer:
        port: int = attrs.field(default=80, metadata={"json_schema": {"type": "integer"}})
        inner: Inner | None = None
        color: Color = Color.BLUE
        tags: tuple[str, ...] = ("a", "b")
        weights: Mapping[str, float] = attrs.field(factory=dict)
        extra: Any = None

    props = attrs_schema(Outer)["properties"]
    assert props["port"] == {"type": "integer", "default": 80}
    inner = props["inner"]["anyOf"][0]
    assert inner["additionalProperties"] is False
    assert inner["required"] == ["level"]
    assert inner["properties"]["level"] == {"type": "integer"}
    assert props["color"] == {"enum": [1, 2], "default": 2}
    assert props["tags"]["default"] == ["a", "b"]
    assert props["weights"]["additionalProperties"] == {"type": "number"}
    assert props["extra"] == {"default": None}
    assert "required" not in attrs_schema(Outer)


def test_deployment_schema_has_core_keys_and_sections():
    schema = deployment_schema({"kernel": KernelSettings})
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["kernel"] == attrs_schema(KernelSettings)
    assert props["kernel"]["properties"]["log_tail"] == {
        "type": "integer",
        "minimum": 0,
        "default": 2000,
    }
    assert props["units"]["additionalProperties"] == attrs_schema(UnitSpec)
    assert props["plugins"] == {"type": "array", "items": {"type": "string"}}
    assert props["name"]["type"] == "string"
    assert props["units"]["propertyNames"] == {"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"}
    with pytest.raises(ValueError, match="units"):
        deployment_schema({"units": KernelSettings})


def test_the_demo_deployment_validates():
    assert errors(demo_document()) == []


def test_a_typod_unit_key_fails_validation():
    document = demo_document()
    unit = document["units"]["echo"]
    unit["comand"] = unit.pop("command")
    found = errors(document)
    assert any("'comand'" in e for e in found), found
    assert any("'command' is a required property" in e for e in found), found


# config.py's strict ``str`` hook also catches StrEnum fields (singledispatch on
# the subclass), so the loader keeps an unknown ``start`` as a bare string.
WRONG_VALUES = [
    ("units", "startup_timeout", "three"),
    ("units", "start", "sometimes"),
    ("units", "interfaces", "hsu.echo.v1.Echo"),
    ("units", "env", {"A": 1}),
    ("units", "command", []),
    ("units", "command", 3),
    ("kernel", "log_tail", 1.5),
    ("kernel", "log_tail", -1),
    ("kernel", "address", 7420),
    ("echo-demo", "calls", "3"),
]


def with_wrong_value(where: str, key: str, value: Any) -> dict[str, Any]:
    document = demo_document()
    target = document["units"]["echo"] if where == "units" else document[where]
    target[key] = value
    return document


def test_startup_timeout_three_fails_validation():
    found = errors(with_wrong_value("units", "startup_timeout", "three"))
    assert len(found) == 1, found
    assert found[0].startswith("['units', 'echo', 'startup_timeout']: 'three'"), found


@pytest.mark.parametrize(("where", "key", "value"), WRONG_VALUES)
def test_a_wrong_value_fails_validation(where, key, value):
    assert errors(with_wrong_value(where, key, value)), f"{where}.{key}={value!r} passed"


@pytest.mark.parametrize(
    ("where", "key", "value"),
    WRONG_VALUES,
)
def test_the_loader_rejects_what_the_schema_rejects(where, key, value):
    document = with_wrong_value(where, key, value)
    with pytest.raises(ConfigError):
        structure_sections(deployment_from_dict(document), SECTIONS)


def test_a_misspelt_section_fails_validation():
    document = demo_document()
    document["kernal"] = document.pop("kernel")
    assert any("'kernal'" in e for e in errors(document))


@pytest.mark.parametrize(
    "unit",
    [
        {"command": "python -m hsu_echo"},
        {"command": ["python"], "env": {"A": "1"}, "cwd": None, "start": "at-start"},
        {"command": ["x"], "startup_timeout": 1, "stop_grace": 0.5, "stop_grase": 1},
    ],
)
def test_schema_and_loader_agree_on_units(unit):
    document = {"units": {"u": copy.deepcopy(unit)}}
    try:
        deployment_from_dict(document)
        loads = True
    except ConfigError:
        loads = False
    assert (errors(document) == []) is loads


# -- plugin options: probes, balancers, breakers ----------------------------------


@pytest.fixture(scope="module")
def plugins() -> PluginManager:
    return PluginManager.load([], env={}, autoload=False)


def plugin_errors(plugins: PluginManager, document: Any) -> list[str]:
    schema = deployment_schema(SECTIONS, **plugin_choices(plugins))
    validator = jsonschema.Draft202012Validator(schema)
    found = []
    for e in validator.iter_errors(document):
        for sub in [e, *e.context]:  # health is "an object or null": look inside
            found.append(f"{list(sub.absolute_path)}: {sub.message}")
    return found


def loader_accepts(document: Any) -> bool:
    """What the kernel makes of it: its plugins' defaults, names and options."""
    try:
        build_kernel(document)
    except ConfigError:
        return False
    return True


def with_unit(**unit: Any) -> dict[str, Any]:
    document = demo_document()
    document["units"]["echo"].update(unit)
    return document


def test_the_schema_with_plugins_is_valid_and_lists_the_registered_names(plugins):
    schema = deployment_schema(SECTIONS, **plugin_choices(plugins))
    jsonschema.Draft202012Validator.check_schema(schema)
    unit = schema["properties"]["units"]["additionalProperties"]
    [health] = [b for b in unit["properties"]["health"]["anyOf"] if b.get("title") == "Health"]
    assert health["properties"]["probe"]["enum"] == plugins.probe_names()
    routing = unit["properties"]["routing"]
    [balancer] = [b for b in routing["properties"]["balancer"]["anyOf"] if "enum" in b]
    assert balancer["enum"] == plugins.balancer_names()
    [breaker] = [b for b in routing["properties"]["breaker"]["anyOf"] if "enum" in b]
    assert breaker["enum"] == plugins.breaker_names()


def test_each_name_gets_its_options_with_types_defaults_and_bounds(plugins):
    schema = deployment_schema(SECTIONS, **plugin_choices(plugins))
    unit = schema["properties"]["units"]["additionalProperties"]
    routing = unit["properties"]["routing"]

    def options_of(where: dict[str, Any], key: str, name: str, options_key: str) -> Any:
        for rule in where["allOf"]:
            if rule["if"]["properties"].get(key) in ({"const": name}, {"enum": [name, None]}):
                return rule["then"]["properties"][options_key]
        raise AssertionError(f"no rule for {name}")

    ring = options_of(routing, "balancer", "ring_hash", "balancer_options")
    assert ring["additionalProperties"] is False
    assert ring["properties"]["replicas"] == {"type": "integer", "minimum": 1, "default": 100}
    maglev = options_of(routing, "balancer", "maglev", "balancer_options")["properties"]
    assert maglev["table_size"] == {
        "type": "integer",
        "minimum": 2,
        "maximum": 2**24,
        "default": 65537,
    }
    ratio = options_of(routing, "breaker", "ratio", "breaker_options")["properties"]
    assert ratio["ratio"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "default": 0.5,
    }
    [health] = [b for b in unit["properties"]["health"]["anyOf"] if b.get("title") == "Health"]
    tcp = options_of(health, "probe", "tcp", "options")["properties"]
    assert tcp["port"]["minimum"] == 1 and tcp["port"]["maximum"] == 65535
    assert options_of(health, "probe", "exec", "options")["required"] == ["command"]


GOOD_UNITS = [
    {
        "routing": {
            "balancer": "ring_hash",
            "balancer_options": {"replicas": 5, "bounded_load": 1.25},
        }
    },
    {"routing": {"balancer": "maglev", "balancer_options": {"table_size": 5003}}},
    {"routing": {"balancer": "p2c", "balancer_options": {"seed": 3}}},
    {"routing": {"breaker": "ratio", "breaker_options": {"window": 5, "min_calls": 5}}},
    {"routing": {"breaker_options": {"failures": 2, "cooldown": 0.5}}},
    {"health": {"probe": "tcp", "options": {"port": 8080}}},
    {"health": {"probe": "http", "options": {"url": "http://127.0.0.1:8080/healthz"}}},
    {"health": {"probe": "exec", "options": {"command": ["true"]}}},
    {"health": {"probe": "process"}},
    {"health": None},
]
BAD_UNITS = [
    {"routing": {"balancer": "ring_hash", "balancer_options": {"replicas": 0}}},
    {"routing": {"balancer": "ring_hash", "balancer_options": {"replicas": "2"}}},
    {"routing": {"balancer": "ring_hash", "balancer_options": {"bounded_load": 0.5}}},
    {"routing": {"balancer": "maglev", "balancer_options": {"tablesize": 7}}},
    {"routing": {"balancer": "p2", "balancer_options": {}}},
    {"routing": {"balancer_options": {"seed": 1}}},  # the default round_robin has none
    {"routing": {"breaker": "ratio", "breaker_options": {"ratio": 1.5}}},
    {"routing": {"breaker_options": {"failures": 0}}},
    {"health": {"probe": "tcp", "options": {"port": 70000}}},
    {"health": {"probe": "exec", "options": {}}},
    {"health": {"probe": "process", "options": {"pid": 1}}},
    {"health": {"probe": "tpc"}},
]


@pytest.mark.parametrize("unit", GOOD_UNITS)
def test_real_plugin_options_validate_and_load(plugins, unit):
    document = with_unit(**copy.deepcopy(unit))
    assert plugin_errors(plugins, document) == []
    assert loader_accepts(document)


@pytest.mark.parametrize("unit", BAD_UNITS)
def test_a_bad_plugin_option_fails_validation_and_loading(plugins, unit):
    document = with_unit(**copy.deepcopy(unit))
    assert plugin_errors(plugins, document), f"{unit} passed the schema"
    assert not loader_accepts(document)


def test_a_bad_option_is_reported_at_its_path(plugins):
    document = with_unit(routing={"balancer": "ring_hash", "balancer_options": {"replicas": 0}})
    assert plugin_errors(plugins, document) == [
        "['units', 'echo', 'routing', 'balancer_options', 'replicas']:"
        " 0 is less than the minimum of 1"
    ]
