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
from hsu._kernel.config.schema import attrs_schema, deployment_schema
from hsu.errors import ConfigError

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
    assert props["startup_timeout"]["type"] == "number"
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
    assert props["kernel"]["properties"]["log_tail"] == {"type": "integer", "default": 2000}
    assert props["units"]["additionalProperties"] == attrs_schema(UnitSpec)
    assert props["plugins"] == {"type": "array", "items": {"type": "string"}}
    assert props["name"] == {"type": "string"}
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
