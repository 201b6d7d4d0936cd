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
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override

from hsu.config_sources import Origin, PathT, Secrets, format_path, origin_of
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
    #: where each value came from, for messages and ``hsu config show``
    origins: Mapping[PathT, Origin] = attrs.field(factory=dict, repr=False, eq=False)
    #: secret references and what they resolved to (never shown)
    secrets: Secrets = attrs.field(factory=Secrets, repr=False, eq=False)


def make_converter() -> cattrs.Converter:
    """One converter for the whole deployment: strict, no unknown keys."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    conv.register_structure_hook(float, _strict_number(float))
    conv.register_structure_hook(int, _strict_number(int))
    conv.register_structure_hook(str, _strict_str)
    # after str: a StrEnum is a str, and singledispatch takes the nearest class
    conv.register_structure_hook(enum.StrEnum, _strict_enum)
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


def _strict_enum(value: Any, cls: type[enum.StrEnum]) -> enum.StrEnum:
    try:
        return cls(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"expected one of {options}, got {value!r}") from None


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


def _messages(exc: BaseException, path: PathT) -> list[tuple[PathT, str]]:
    """Flatten a cattrs error into one (path, message) per problem."""
    out: list[tuple[PathT, str]] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            out.append(((*path, key), f"unknown key{_suggest(key, valid)}"))
        return out
    if isinstance(exc, ClassValidationError | IterableValidationError):
        with_notes, without_notes = exc.group_exceptions()
        for sub, note in with_notes:
            name = getattr(note, "name", None)
            part: Any = name if name is not None else getattr(note, "index", None)
            out.extend(_messages(sub, (*path, part)))
        for sub in without_notes:
            out.extend(_messages(sub, path))
        return out
    if isinstance(exc, KeyError):
        return [(path, "required key missing")]
    if isinstance(exc, ExceptionGroup):
        for sub in exc.exceptions:
            out.extend(_messages(sub, path))
        return out
    return [(path, str(exc))]


def describe(path: PathT, message: str, source: str, origins: Mapping[PathT, Origin]) -> str:
    """``deployment.yaml:14: units.echo.stop_grace: expected float, got 'three'``."""
    origin = origin_of(origins, path)
    return f"{origin or source}: {format_path(path)}: {message}"


def structure(
    data: Any,
    cls: Any,
    path: PathT,
    source: str,
    origins: Mapping[PathT, Origin] | None = None,
) -> Any:
    """Turn raw data into ``cls`` or raise :class:`ConfigError` listing every problem."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:
        problems = [describe(p, m, source, origins or {}) for p, m in _messages(exc, path)]
        raise ConfigError(problems, source) from None


def load_deployment(path: str | Path) -> Deployment:
    """Read one deployment file (YAML, JSON or TOML) with no other source."""
    from hsu.config_files import read_file

    path = Path(path)
    layer = read_file(path)
    return deployment_from_dict(
        layer.data,
        source=str(path),
        base_dir=str(path.resolve().parent),
        default_name=path.stem,
        origins=layer.origins,
    )


def deployment_from_dict(
    raw: Any,
    *,
    source: str = "<dict>",
    base_dir: str = ".",
    default_name: str = "hsu",
    origins: Mapping[PathT, Origin] | None = None,
    secrets: Secrets | None = None,
) -> Deployment:
    origins = origins or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping at the top, got {type(raw).__name__}"])
    problems: list[str] = []
    name = raw.get("name", default_name)
    if not isinstance(name, str):
        problems.append(describe(("name",), f"expected a string, got {name!r}", source, origins))
    plugins: tuple[str, ...] = ()
    units: dict[str, UnitSpec] = {}
    try:
        plugins = structure(raw.get("plugins", []), tuple[str, ...], ("plugins",), source, origins)
    except ConfigError as exc:
        problems.extend(exc.problems)
    raw_units = raw.get("units") or {}
    if not isinstance(raw_units, dict):
        problems.append(
            describe(("units",), "expected a mapping of unit name to unit", source, origins)
        )
        raw_units = {}
    for unit_name, spec in raw_units.items():
        try:
            units[str(unit_name)] = structure(
                spec, UnitSpec, ("units", str(unit_name)), source, origins
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, source)
    sections = {k: v for k, v in raw.items() if k not in CORE_KEYS}
    return Deployment(
        name=name,
        plugins=plugins,
        units=units,
        sections=sections,
        source=source,
        base_dir=base_dir,
        origins=dict(origins),
        secrets=secrets or Secrets(),
    )


def structure_sections(deployment: Deployment, classes: Mapping[str, type[Any]]) -> dict[str, Any]:
    """Type every plugin section; sections no plugin registered are errors."""
    problems: list[str] = []
    settings: dict[str, Any] = {}
    valid = [*CORE_KEYS, *classes]
    origins = deployment.origins
    for key in deployment.sections:
        if key not in classes:
            problems.append(
                describe(
                    (key,),
                    f"no enabled plugin has a settings section of this name{_suggest(key, valid)}",
                    deployment.source,
                    origins,
                )
            )
    for section, cls in classes.items():
        data = deployment.sections.get(section)
        try:
            settings[section] = structure(data or {}, cls, (section,), deployment.source, origins)
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
