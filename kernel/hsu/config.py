"""Configuration documents into layers: the toolbox of config-source plugins.

A config source (:class:`hsu.ports.ConfigSource`) returns :class:`hsu.ports.Layer`
objects: the data plus the origin of every path, so an error can say
``deploy.yaml:14``. :func:`read_file` reads a YAML, JSON or TOML file (YAML and
JSON keep line numbers; TOML, read with the standard library, gives the file
name only); :func:`env_layer` and :func:`overrides_layer` build the layers of
``HSU_A__B=...`` variables and ``--set a.b=...`` options.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hsu.errors import ConfigError
from hsu.ports import Layer, Origin, PathT

SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def read_file(path: Path) -> Layer:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"], source) from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"], source) from None
        return Layer(data, {(): Origin(source)} | _all_paths(data, Origin(source)))
    if path.suffix not in SUFFIXES:
        raise ConfigError(
            [f"{source}: unknown file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"],
            source,
        )
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: expected a mapping at the top, got {type(data).__name__}"], source
        )
    origins: dict[PathT, Origin] = {(): Origin(source, 1)}
    if node is not None:
        _lines(node, (), source, origins)
    return Layer(data, origins)


def _lines(node: yaml.Node, path: PathT, source: str, out: dict[PathT, Origin]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            out[child] = Origin(source, key_node.start_mark.line + 1)
            _lines(value_node, child, source, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = (*path, i)
            out[child] = Origin(source, item.start_mark.line + 1)
            _lines(item, child, source, out)


def _all_paths(data: Any, origin: Origin, prefix: PathT = ()) -> dict[PathT, Origin]:
    out: dict[PathT, Origin] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out[(*prefix, k)] = origin
            out.update(_all_paths(v, origin, (*prefix, k)))
    return out


def env_layer(env: Mapping[str, str], prefix: str = "HSU_") -> Layer:
    """``HSU_UNITS__ECHO__MAX_INSTANCES=4`` sets ``units.echo.max_instances: 4``.

    Only names with ``__`` are configuration (``HSU_PLUGINS`` and the other
    single-level names are the kernel's own switches). Values are read as YAML
    scalars or flow collections, so ``4`` is a number and ``[a, b]`` a list.
    """
    layer = Layer()
    for name in sorted(env):
        if not name.startswith(prefix) or "__" not in name:
            continue
        keys = [k.lower() for k in name[len(prefix) :].split("__")]
        if not all(keys):
            continue
        _set(layer, tuple(keys), parse_scalar(env[name]), Origin(f"env {name}"))
    return layer


def overrides_layer(overrides: tuple[str, ...]) -> Layer:
    """``--set units.echo.max_instances=4``: a dotted path, ``=``, a YAML value."""
    layer = Layer()
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        keys = tuple(k.strip() for k in key.split("."))
        if not sep or not all(keys):
            problems.append(f"--set {item}: expected PATH=VALUE, e.g. units.echo.max_instances=4")
            continue
        _set(layer, keys, parse_scalar(raw), Origin(f"--set {item}"))
    if problems:
        raise ConfigError(problems)
    return layer


def _set(layer: Layer, keys: tuple[str, ...], value: Any, origin: Origin) -> None:
    node = layer.data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = node[k] = {}
        node = child
    node[keys[-1]] = value
    layer.origins[keys] = origin


def parse_scalar(raw: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if value is None and raw.strip() not in ("null", "~") else value
