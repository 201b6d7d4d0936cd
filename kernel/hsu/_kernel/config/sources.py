"""Layered configuration: sources (plugins) produce layers, merged by priority.

A :class:`ConfigSource` turns its input (files, the environment, command-line
overrides, later a distributed store) into a :class:`Layer`: the data plus,
for every path, where it came from. Layers merge in ascending ``priority``
(mappings deep-merge, anything else is replaced), so the documented order is:

    file (10) < environment (20) < --set overrides (30)

Secrets are references, ``${env:NAME}`` and ``${file:PATH}``, resolved after the
merge; what they resolve to is never shown by ``hsu config show`` or logged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from hsu.errors import ConfigError
from hsu.ports import ConfigSource, Layer, Origin, PathT, SourceContext


def format_path(path: PathT) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out and re.fullmatch(r"[A-Za-z0-9_\-]+", part):
            out += f".{part}"
        elif out:
            out += f"[{part!r}]"
        else:
            out = part
    return out or "(top)"


DEFAULT = Origin("default")


def merge(layers: list[Layer]) -> Layer:
    """Deep-merge layers in order; later ones win, origins follow the values."""
    out = Layer()
    for layer in layers:
        _merge_into(out.data, layer.data, (), out.origins, layer.origins)
    return out


def _merge_into(
    dst: dict[str, Any],
    src: Mapping[str, Any],
    prefix: PathT,
    dst_origins: dict[PathT, Origin],
    src_origins: Mapping[PathT, Origin],
) -> None:
    for key, value in src.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value, path, dst_origins, src_origins)
            if path in src_origins:
                dst_origins.setdefault(path, src_origins[path])
            continue
        dst[key] = _copy(value)
        for p in [p for p in dst_origins if p[: len(path)] == path]:
            del dst_origins[p]
        for p, origin in src_origins.items():
            if p[: len(path)] == path:
                dst_origins[p] = origin


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def origin_of(origins: Mapping[PathT, Origin], path: PathT) -> Origin | None:
    """The origin of ``path`` or of its nearest ancestor that has one."""
    for n in range(len(path), 0, -1):
        found = origins.get(path[:n])
        if found is not None:
            return found
    return None


def leaves(data: Any, prefix: PathT = ()) -> Iterator[tuple[PathT, Any]]:
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from leaves(v, (*prefix, k))
    else:
        yield prefix, data


# -- secrets -----------------------------------------------------------------

SECRET_RE = re.compile(r"\$\$|\$\{(env|file):([^}]*)\}")


@attrs.define
class Secrets:
    """The paths that held references and the values they resolved to."""

    paths: dict[PathT, str] = attrs.field(factory=dict)  # path -> the reference text
    values: set[str] = attrs.field(factory=set)

    def redact(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            if value:
                text = text.replace(value, "***")
        return text


def resolve_secrets(
    data: Any, origins: Mapping[PathT, Origin], env: Mapping[str, str], base_dir: Path
) -> tuple[Any, Secrets, list[str]]:
    """Replace ``${env:NAME}`` / ``${file:PATH}`` in every string; ``$$`` is ``$``."""
    secrets = Secrets()
    problems: list[str] = []

    def walk(value: Any, path: PathT) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value

        def one(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            kind, name = m.group(1), m.group(2).strip()
            where = origin_of(origins, path)
            prefix = f"{where}: " if where else ""
            if kind == "env":
                if name not in env:
                    problems.append(
                        f"{prefix}{format_path(path)}: ${{env:{name}}}: {name} is not set"
                    )
                    return ""
                secret = env[name]
            else:
                file = Path(name).expanduser()
                file = file if file.is_absolute() else base_dir / file
                try:
                    secret = file.read_text(encoding="utf-8").rstrip("\n")
                except OSError as exc:
                    problems.append(
                        f"{prefix}{format_path(path)}: ${{file:{name}}}: cannot read"
                        f" {file}: {exc.strerror}"
                    )
                    return ""
            secrets.values.add(secret)
            return secret

        resolved = SECRET_RE.sub(one, value)
        if SECRET_RE.search(value) and any(m.group(0) != "$$" for m in SECRET_RE.finditer(value)):
            secrets.paths[path] = value
        return resolved

    return walk(data, ()), secrets, problems


def gather(sources: list[ConfigSource], ctx: SourceContext) -> Layer:
    """Load every source, collecting every problem, and merge by priority."""
    layers: list[Layer] = []
    problems: list[str] = []
    for source in sorted(sources, key=lambda s: s.priority):
        try:
            layers.extend(source.load(ctx))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return merge(layers)
