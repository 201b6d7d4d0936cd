"""JSON Schema (draft 2020-12) for deployment files, derived from the attrs classes.

It mirrors what :mod:`hsu._kernel.config.model`'s strict converter accepts, so editors can
flag unknown keys, wrong types and values out of bounds before ``hsu run`` does. The
options of probes, balancers and breakers are attrs classes too: a unit's ``health``
and ``routing`` list the registered names and, per name, that plugin's options.
"""

from __future__ import annotations

import copy
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from hsu._kernel.config.model import CORE_KEYS, DEPLOYMENT_NAME, UNIT_NAME, Routing, UnitSpec
from hsu.config import DURATION_PATTERN, Seconds

_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
}
_ARRAYS = (list, tuple, set, frozenset, Sequence)
_OBJECTS = (dict, Mapping)
_STRINGS = {"type": "array", "items": {"type": "string"}}
_COMMAND = {"anyOf": [{"type": "string", "minLength": 1}, {**_STRINGS, "minItems": 1}]}
_NO_DEFAULT = object()
#: hsu.config.Seconds: a number, or a duration string (500ms, 5s, 2m)
_SECONDS = {
    "anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": DURATION_PATTERN},
    ],
    "description": "seconds: a number, or a duration such as 500ms, 5s, 2m, 1h, 1m30s",
}

# attrs' validator classes, to read bounds from (their names are private)
_AND: Any = type(attrs.validators.and_())
_OPTIONAL: Any = type(attrs.validators.optional(attrs.validators.ge(0)))
_NUMBER: Any = type(attrs.validators.ge(0))
_IN: Any = type(attrs.validators.in_(()))
_BOUNDS = {">=": "minimum", ">": "exclusiveMinimum", "<=": "maximum", "<": "exclusiveMaximum"}


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp == Seconds:
        return copy.deepcopy(_SECONDS)
    if typing.get_origin(tp) is typing.Annotated:
        return _type_schema(typing.get_args(tp)[0])
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [member.value for member in tp]}
    if isinstance(tp, type) and attrs.has(tp):
        return attrs_schema(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(arg) for arg in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin is tuple and args and args[-1] is not Ellipsis:
        items = [_type_schema(arg) for arg in args]
        return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
    if tp in _ARRAYS or origin in _ARRAYS:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if tp in _OBJECTS or origin in _OBJECTS:
        if len(args) == 2:
            return {"type": "object", "additionalProperties": _type_schema(args[1])}
        return {"type": "object"}
    return {}  # Any, an unresolved string annotation, or a type we do not know


def _json_default(value: Any) -> Any:
    """``value`` as JSON, or ``_NO_DEFAULT`` when it is not a plain JSON value."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        items = [_json_default(item) for item in value]
        return _NO_DEFAULT if any(item is _NO_DEFAULT for item in items) else items
    return _NO_DEFAULT


def _validator_schema(validator: Any) -> dict[str, Any]:
    """What ``validator`` bounds, in JSON Schema: attrs' ``ge``/``gt``/``le``/``lt``
    as ``minimum`` ..., ``in_`` as ``enum``, through ``and_`` and ``optional``
    (``minimum`` applies to numbers only, so ``null`` stays valid). Validators
    of one's own add nothing: the loader still runs them."""
    out: dict[str, Any] = {}
    if isinstance(validator, _AND):
        for inner in validator._validators:
            out.update(_validator_schema(inner))
    elif isinstance(validator, _OPTIONAL):
        out.update(_validator_schema(validator.validator))
    elif isinstance(validator, _NUMBER) and validator.compare_op in _BOUNDS:
        bound = _json_default(validator.bound)
        if isinstance(bound, int | float) and not isinstance(bound, bool):
            out[_BOUNDS[validator.compare_op]] = bound
    elif isinstance(validator, _IN):
        values = [_json_default(v) for v in validator.options]
        if all(v is not _NO_DEFAULT for v in values):
            out["enum"] = values
    return out


def attrs_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of one attrs class as the strict converter structures it.

    Fields without a default are required; plain JSON defaults (not factories)
    are given as ``default``; attrs' bound validators give ``minimum`` and the
    like (:func:`_validator_schema`). A field's ``metadata["json_schema"]`` is used
    verbatim: ``config.py`` should attach it wherever a converter widens what
    the annotation says. Until ``UnitSpec.command`` has it, a field named
    ``command`` with a converter is "a string or a non-empty list of strings".
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class")
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except NameError:  # an annotation only importable under TYPE_CHECKING
        hints = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    field: attrs.Attribute[Any]
    for field in attrs.fields(cls):
        if not field.init:  # the converter never reads these
            continue
        if "json_schema" in field.metadata:
            prop = copy.deepcopy(dict(field.metadata["json_schema"]))
        elif field.converter is not None and field.name == "command":
            prop = copy.deepcopy(_COMMAND)
        else:
            prop = _type_schema(hints.get(field.name, field.type))
            if field.validator is not None:
                prop.update(_validator_schema(field.validator))
        if field.default is attrs.NOTHING:
            required.append(field.name)
        elif field.name != "command" and not isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            default = _json_default(field.default)
            if default is not _NO_DEFAULT:
                prop["default"] = default
        properties[field.name] = prop
    schema: dict[str, Any] = {
        "title": cls.__name__,
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        schema["required"] = required
    schema.update(copy.deepcopy(getattr(cls, "__json_schema_extra__", {})))
    return schema


def plugin_choices(plugins: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`deployment_schema` for the probes,
    balancers and breakers a plugin manager has registered."""
    return {
        "probes": {n: plugins.probe(n) for n in plugins.probe_names()},
        "balancers": {n: plugins.balancer(n) for n in plugins.balancer_names()},
        "breakers": {n: plugins.breaker(n) for n in plugins.breaker_names()},
        "defaults": {k: plugins.default(k) for k in ("balancer", "breaker")},
    }


def _object_titled(schema: dict[str, Any], title: str) -> dict[str, Any] | None:
    """The object schema of the attrs class ``title``: ``schema`` or one of its
    ``anyOf`` branches (an optional field)."""
    candidate: dict[str, Any]
    for candidate in [schema, *schema.get("anyOf", ())]:
        if candidate.get("title") == title:
            return candidate
    return None


def _choose(
    schema: dict[str, Any],
    key: str,
    options_key: str,
    choices: Mapping[str, Any],
    default: str | None = None,
) -> None:
    """Give ``schema``'s ``key`` the registered names, and its ``options_key``
    the options of the one named: one ``if``/``then`` per name. ``default`` is
    the name a unit gets when it leaves ``key`` out (or sets it to null)."""
    prop = schema["properties"][key]
    for branch in [prop, *prop.get("anyOf", ())]:
        if branch.get("type") == "string":
            branch["enum"] = sorted(choices)
    rules = []
    for name in sorted(choices):
        named: dict[str, Any] = {"properties": {key: {"const": name}}, "required": [key]}
        if name == default:  # also when left out or null
            named = {"properties": {key: {"enum": [name, None]}}}
        options = attrs_schema(choices[name].options)
        rules.append({"if": named, "then": {"properties": {options_key: options}}})
    if rules:
        schema.setdefault("allOf", []).extend(rules)


def unit_schema(
    probes: Mapping[str, Any] | None = None,
    balancers: Mapping[str, Any] | None = None,
    breakers: Mapping[str, Any] | None = None,
    defaults: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The schema of one unit; with the registered probes, balancers and
    breakers (each with its ``options`` class), their names and options too."""
    unit = attrs_schema(UnitSpec)
    defaults = defaults or {}
    health = _object_titled(unit["properties"]["health"], "Health")
    if health is not None and probes is not None:
        _choose(health, "probe", "options", probes)
    routing = _object_titled(unit["properties"]["routing"], "Routing")
    for key, choices in (("balancer", balancers), ("breaker", breakers)):
        if routing is not None and choices is not None:
            field_default = attrs.fields_dict(Routing)[key].default
            default = field_default if isinstance(field_default, str) else defaults.get(key)
            _choose(routing, key, f"{key}_options", choices, default)
    return unit


def deployment_schema(
    sections: Mapping[str, type],
    *,
    probes: Mapping[str, Any] | None = None,
    balancers: Mapping[str, Any] | None = None,
    breakers: Mapping[str, Any] | None = None,
    defaults: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The schema of a whole deployment file; ``sections`` maps section name to
    class; the rest is what :func:`plugin_choices` gives, for :func:`unit_schema`."""
    clashes = sorted(set(sections) & set(CORE_KEYS))
    if clashes:
        raise ValueError(f"section names clash with core keys: {clashes}")
    unit = unit_schema(probes, balancers, breakers, defaults)
    properties: dict[str, Any] = {
        "name": {"type": "string", "pattern": f"^{DEPLOYMENT_NAME.pattern}$"},
        "plugins": copy.deepcopy(_STRINGS),
        "units": {
            "type": "object",
            "propertyNames": {"pattern": f"^{UNIT_NAME.pattern}$"},
            "additionalProperties": unit,
        },
    }
    properties.update((name, attrs_schema(cls)) for name, cls in sections.items())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hsu deployment",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
