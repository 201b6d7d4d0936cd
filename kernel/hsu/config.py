"""Read a deployment file into a :class:`Layer`, with the line of every key.

YAML and JSON (a JSON document is YAML too) keep line numbers; TOML, read with
the standard library, gives the file name only.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from hsu._kernel.config.sources import Layer, Origin, PathT
from hsu.errors import ConfigError

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
