"""Layered configuration: sources (plugins) produce layers, merged by priority.

A :class:`ConfigSource` turns its input (files, the environment, command-line
overrides, later a distributed store) into a :class:`Layer`: the data plus,
for every path, where it came from. Layers merge in ascending ``priority``
(mappings deep-merge, anything else is replaced), so the documented order is:

    file (10) < environment (20) < --set overrides (30)

Secrets are references, ``${env:NAME}`` and ``${file:PATH}``, resolved after the
merge; what they resolve to is never shown by ``hsu config show`` or quoted by
an error, and a file is read only from the deployment's folder or
``kernel.secret_roots``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import attrs

from hsu.config import DeferredOrigins, SecretStr
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
    """Deep-merge layers in order; later ones win, origins follow the values.

    If a layer's origins are :class:`~hsu.config.DeferredOrigins` (a file's),
    so are the merged ones: worked out by merging again when first asked
    for, from each such layer made once more, and the others as they were."""
    if not any(isinstance(layer.origins, DeferredOrigins) for layer in layers):
        return _merge_all(layers)
    kept = [
        layer.origins.again
        if isinstance(layer.origins, DeferredOrigins) and layer.origins.again is not None
        else Layer(_copy(layer.data), dict(layer.origins))
        for layer in layers
    ]
    out = Layer()
    full = [layer for layer in layers if layer.data]
    if len(full) == 1:
        # nothing to merge into it: taken as it is (nothing changes the
        # merged data; resolve_secrets copies what it replaces)
        out.data = full[0].data
    for layer in full if len(full) > 1 else ():
        if not out.data:
            out.data = _copy(layer.data)
        else:
            _merge_into(out.data, layer.data, (), None, {})

    def again() -> Layer:
        return _merge_all([k() if callable(k) else k for k in kept])

    out.origins = DeferredOrigins(lambda: again().origins, again)
    return out


def _merge_all(layers: list[Layer]) -> Layer:
    out = Layer()
    for layer in layers:
        if not out.data:  # the first: a copy (what _merge_into makes, in one pass)
            out.data = _copy(layer.data)
            out.origins = {p: o for p, o in layer.origins.items() if p and p[0] in out.data}
            continue
        _merge_into(out.data, layer.data, (), out.origins, layer.origins)
    return out


def _merge_into(
    dst: dict[str, Any],
    src: Mapping[str, Any],
    prefix: PathT,
    dst_origins: MutableMapping[PathT, Origin] | None,
    src_origins: Mapping[PathT, Origin],
) -> None:
    """``src`` into ``dst``; with ``dst_origins``, the origins too."""
    for key, value in src.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value, path, dst_origins, src_origins)
            if dst_origins is not None and path in src_origins:
                dst_origins.setdefault(path, src_origins[path])
            continue
        dst[key] = _copy(value)
        if dst_origins is None:
            continue
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

#: resolved values shorter than this are not redacted from text (they would
#: mangle it: a secret "1" would hide every digit one); ``hsu config show``
#: hides every resolved value whatever its length
MIN_SECRET_LENGTH = 4
#: the largest file a ``${file:PATH}`` reference reads
MAX_SECRET_FILE_BYTES = 64 * 1024


@attrs.define
class Resolved:
    """What :func:`resolve_secrets` found: the data with every reference
    replaced, where the references were, and what they resolved to."""

    data: Any
    #: path -> the string as written, references and all (what ``hsu config show`` prints)
    references: dict[PathT, str] = attrs.field(factory=dict)
    #: every value a reference resolved to
    values: set[str] = attrs.field(factory=set)
    problems: list[str] = attrs.field(factory=list)


def secret_roots(data: Any, base_dir: Path) -> list[Path]:
    """The folders ``${file:..}`` may read: the deployment's folder and
    ``kernel.secret_roots`` (relative to it), symlinks resolved."""
    roots = [base_dir.resolve()]
    kernel = data.get("kernel") if isinstance(data, dict) else None
    extra = kernel.get("secret_roots") if isinstance(kernel, dict) else None
    if isinstance(extra, list):
        for root in extra:
            if isinstance(root, str) and root and "$" not in root:
                roots.append((base_dir / Path(root).expanduser()).resolve())
    return roots


def read_secret_file(name: str, base_dir: Path, roots: list[Path]) -> str:
    """The content of ``${file:NAME}`` (trailing newlines dropped), or a
    ``ValueError`` saying why not; the content is never part of a message."""
    asked = base_dir / Path(name).expanduser()
    target = asked.resolve()
    if not any(target.is_relative_to(root) for root in roots):
        how = f" (it resolves to {target})" if target != asked else ""
        allowed = ", ".join(str(r) for r in roots)
        raise ValueError(
            f"{asked} is outside the folders secrets may be read from{how}: {allowed};"
            " kernel.secret_roots adds folders"
        )
    try:
        with target.open("rb") as f:
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {asked}: {exc.strerror}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"{asked} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{asked} is not valid UTF-8 at byte {exc.start}") from None
    return text.rstrip("\n")


def resolve_secrets(
    data: Any, origins: Mapping[PathT, Origin], env: Mapping[str, str], base_dir: Path
) -> Resolved:
    """Replace ``${env:NAME}`` / ``${file:PATH}`` in every string; ``$$`` is ``$``.

    A string with a reference becomes a :class:`~hsu.config.SecretStr`. A
    file is read only inside the deployment's folder or ``kernel.secret_roots``
    (:func:`read_secret_file`)."""
    found = Resolved(None)
    roots = secret_roots(data, base_dir)

    def walk(value: Any, path: PathT) -> Any:
        """``value`` with its references resolved: the same object where
        there is none (most of a deployment), a copy where there is."""
        if isinstance(value, dict):
            changed = None
            for k, v in value.items():
                if isinstance(v, dict | list) or (isinstance(v, str) and "$" in v):
                    new = walk(v, (*path, k))
                    if new is not v:
                        changed = changed or {}
                        changed[k] = new
            return value if changed is None else {**value, **changed}
        if isinstance(value, list):
            items = [
                walk(v, (*path, i))
                if isinstance(v, dict | list) or (isinstance(v, str) and "$" in v)
                else v
                for i, v in enumerate(value)
            ]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else items
        if not isinstance(value, str) or "$" not in value:
            return value
        referenced = False

        def one(m: re.Match[str]) -> str:
            nonlocal referenced
            if m.group(0) == "$$":
                return "$"
            referenced = True
            kind, name = m.group(1), m.group(2).strip()

            def problem(why: str) -> str:
                where = origin_of(origins, path)  # only now: they may be deferred
                prefix = f"{where}: " if where else ""
                return f"{prefix}{format_path(path)}: ${{{kind}:{name}}}: {why}"

            if kind == "env":
                if name not in env:
                    found.problems.append(problem(f"{name} is not set"))
                    return ""
                secret = env[name]
            else:
                try:
                    secret = read_secret_file(name, base_dir, roots)
                except ValueError as exc:
                    found.problems.append(problem(str(exc)))
                    return ""
            found.values.add(secret)
            return secret

        resolved = SECRET_RE.sub(one, value)
        if not referenced:
            return resolved
        found.references[path] = value
        return SecretStr(resolved)

    found.data = walk(data, ())
    return found


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
