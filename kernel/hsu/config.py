"""The deployment: its schema as frozen attrs classes and the one converter.

A deployment file holds ``name``, ``plugins``, ``units`` and one section per
plugin, keyed by the name the plugin registered its settings class under. Raw
data becomes typed objects only here, at the edge; every problem found is
reported at once with its path and source.
"""

from __future__ import annotations

import difflib
import enum
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override

from hsu.errors import ConfigError

CORE_KEYS = ("name", "plugins", "units")


class StartMode(enum.StrEnum):
    ON_DEMAND = "on-demand"
    AT_START = "at-start"


def _command(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        argv = list(value)
    else:
        raise ValueError(f"expected a string or a list of strings, got {value!r}")
    if not argv:
        raise ValueError("must not be empty")
    return tuple(argv)


@attrs.frozen
class UnitSpec:
    """One kind of HSU: how to start it and what it serves.

    ``command[0] == "python"`` means the interpreter running the kernel, so
    HSUs share its virtual environment.
    """

    command: tuple[str, ...] = attrs.field(converter=_command)
    interfaces: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    start: StartMode = StartMode.ON_DEMAND
    launcher: str = "subprocess"
    #: seconds from spawn to the handshake before the start counts as failed
    startup_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    #: seconds an instance has to exit after being asked, before SIGKILL
    stop_grace: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))


@attrs.frozen
class Deployment:
    name: str
    plugins: tuple[str, ...] = ()
    units: Mapping[str, UnitSpec] = attrs.field(factory=dict)
    #: plugin sections, raw until :func:`structure_sections` types them
    sections: Mapping[str, Any] = attrs.field(factory=dict)
    #: where it came from, for messages
    source: str = "<defaults>"
    #: relative ``cwd`` and paths in units resolve against this
    base_dir: str = "."


def make_converter() -> cattrs.Converter:
    """One converter for the whole deployment: strict, no unknown keys."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    conv.register_structure_hook(float, _strict_number(float))
    conv.register_structure_hook(int, _strict_number(int))
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(
        UnitSpec,
        make_dict_structure_fn(
            UnitSpec,
            conv,
            _cattrs_forbid_extra_keys=True,
            command=override(struct_hook=lambda v, _: _command(v)),
        ),
    )
    return conv


def _strict_number(kind: type[Any]) -> Any:
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected {kind.__name__}, got {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected int, got {value!r}")
        return kind(value)

    return hook


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _structure_str_tuple(value: Any, _: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a list of strings, got item {item!r}")
    return tuple(value)


converter = make_converter()


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _messages(exc: BaseException, path: str, cls: type[Any] | None) -> list[str]:
    """Flatten a cattrs error into one line per problem, each with its path."""
    out: list[str] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            out.append(f"{path}.{key}: unknown key{_suggest(key, valid)}")
        return out
    if isinstance(exc, ClassValidationError | IterableValidationError):
        with_notes, without_notes = exc.group_exceptions()
        for sub, note in with_notes:
            name = getattr(note, "name", None)
            index = getattr(note, "index", None)
            sub_path = f"{path}.{name}" if name is not None else f"{path}[{index!r}]"
            out.extend(_messages(sub, sub_path, None))
        for sub in without_notes:
            out.extend(_messages(sub, path, None))
        return out
    if isinstance(exc, KeyError):
        return [f"{path}: required key missing"]
    if isinstance(exc, ExceptionGroup):
        for sub in exc.exceptions:
            out.extend(_messages(sub, path, cls))
        return out
    return [f"{path}: {exc}"]


def structure(data: Any, cls: type[Any], path: str, source: str) -> Any:
    """Turn raw data into ``cls`` or raise :class:`ConfigError` listing every problem."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:
        raise ConfigError([f"{source}: {m}" for m in _messages(exc, path, cls)], source) from None


def load_deployment(path: str | Path) -> Deployment:
    """Read a deployment file (YAML; JSON is YAML too)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"], source) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"], source) from None
    return deployment_from_dict(
        raw or {}, source=source, base_dir=str(path.resolve().parent), default_name=path.stem
    )


def deployment_from_dict(
    raw: Any, *, source: str = "<dict>", base_dir: str = ".", default_name: str = "hsu"
) -> Deployment:
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping at the top, got {type(raw).__name__}"])
    problems: list[str] = []
    name = raw.get("name", default_name)
    if not isinstance(name, str):
        problems.append(f"{source}: name: expected a string, got {name!r}")
    plugins: tuple[str, ...] = ()
    units: dict[str, UnitSpec] = {}
    try:
        plugins = structure(raw.get("plugins", []), tuple[str, ...], "plugins", source)
    except ConfigError as exc:
        problems.extend(exc.problems)
    raw_units = raw.get("units") or {}
    if not isinstance(raw_units, dict):
        problems.append(f"{source}: units: expected a mapping of unit name to unit")
        raw_units = {}
    for unit_name, spec in raw_units.items():
        try:
            units[str(unit_name)] = structure(spec, UnitSpec, f"units.{unit_name}", source)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, source)
    sections = {k: v for k, v in raw.items() if k not in CORE_KEYS}
    return Deployment(
        name=name, plugins=plugins, units=units, sections=sections, source=source, base_dir=base_dir
    )


def structure_sections(deployment: Deployment, classes: Mapping[str, type[Any]]) -> dict[str, Any]:
    """Type every plugin section; sections no plugin registered are errors."""
    problems: list[str] = []
    settings: dict[str, Any] = {}
    valid = [*CORE_KEYS, *classes]
    for key in deployment.sections:
        if key not in classes:
            problems.append(
                f"{deployment.source}: {key}: no enabled plugin has a settings section of this"
                f" name{_suggest(key, valid)}"
            )
    for section, cls in classes.items():
        data = deployment.sections.get(section)
        try:
            settings[section] = structure(data or {}, cls, section, deployment.source)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, deployment.source)
    return settings


@attrs.frozen
class KernelSettings:
    """The ``kernel`` section of a deployment."""

    #: where the kernel's gRPC API listens: ``host:port`` (loopback by
    #: default) or ``unix:/path``
    address: str = "127.0.0.1:7420"
    #: seconds calls in flight get to finish when the kernel drains
    drain_grace: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: how many of the kernel's own log records StreamLogs can replay
    log_tail: int = attrs.field(default=2000, validator=attrs.validators.ge(0))
