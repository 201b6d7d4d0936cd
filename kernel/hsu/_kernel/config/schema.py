"""JSON Schema (draft 2020-12) for deployment files, derived from the attrs classes.

It mirrors what :mod:`hsu._kernel.config.model`'s strict converter accepts, so editors can
flag unknown keys and wrong types before ``hsu run`` does.
"""

from __future__ import annotations

import copy
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from hsu._kernel.config.model import CORE_KEYS, UnitSpec

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


def _type_schema(tp: Any) -> dict[str, Any]:
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


def attrs_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of one attrs class as the strict converter structures it.

    Fields without a default are required; plain JSON defaults (not factories)
    are given as ``default``. A field's ``metadata["json_schema"]`` is used
    verbatim: ``config.py`` should attach it wherever a converter widens what
    the annotation says. Until ``UnitSpec.command`` has it, a field named
    ``command`` with a converter is "a string or a non-empty list of strings".
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class")
    try:
        hints = typing.get_type_hints(cls)
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


def deployment_schema(sections: Mapping[str, type]) -> dict[str, Any]:
    """The schema of a whole deployment file; ``sections`` maps section name to class."""
    clashes = sorted(set(sections) & set(CORE_KEYS))
    if clashes:
        raise ValueError(f"section names clash with core keys: {clashes}")
    properties: dict[str, Any] = {
        "name": {"type": "string"},
        "plugins": copy.deepcopy(_STRINGS),
        "units": {"type": "object", "additionalProperties": attrs_schema(UnitSpec)},
    }
    properties.update((name, attrs_schema(cls)) for name, cls in sections.items())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hsu deployment",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
