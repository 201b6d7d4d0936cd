"""From sources to a typed deployment, and the effective config with origins.

The plugin list lives in the config, yet config sources are plugins: the
first read uses the sources of the plugins enabled before any config is read
(built-ins, ``-p``, ``HSU_PLUGINS``, autoload); if the deployment's own
``plugins:`` bring more sources, the config is read once more with them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from hsu._kernel.config.model import (
    Deployment,
    converter,
    deployment_from_dict,
    describe,
    structure_sections,
)
from hsu._kernel.config.sources import DEFAULT, format_path, gather, leaves, resolve_secrets
from hsu._kernel.plugins import PluginManager
from hsu.config import redact
from hsu.errors import ConfigError, UnknownPlugin
from hsu.ports import PathT, SourceContext


def context(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> SourceContext:
    return SourceContext(
        files=tuple(Path(f) for f in files),
        env=dict(os.environ if env is None else env),
        overrides=tuple(overrides),
    )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while. Reading a deployment
    makes some ten container objects per value (YAML nodes, marks, the
    data, its copies, the typed units) and frees them by reference counting:
    no cycle among them, yet the collector ran every 700 of them and took
    half the time of reading a 1,000-unit file."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_config(
    plugins: PluginManager, ctx: SourceContext, previous: Deployment | None = None
) -> Deployment:
    """Gather every source, resolve secret references, structure the core keys.

    ``previous``: the running deployment, whose units are reused where their
    raw mapping is the same (:func:`~hsu._kernel.config.model.deployment_from_dict`)."""
    with gc_paused():
        return _read_config(plugins, ctx, previous)


def _read_config(
    plugins: PluginManager, ctx: SourceContext, previous: Deployment | None
) -> Deployment:
    sources = plugins.config_sources()
    problems = []
    for given, what in (("files", "deployment files"), ("overrides", "--set overrides")):
        if getattr(ctx, given) and not any(
            given in getattr(s, "reads", ()) for s in sources.values()
        ):
            blocked = ", ".join(f"no:{name}" for name in sorted(plugins.blocked)) or "none"
            first = getattr(ctx, given)[0]
            problems.append(
                f"{first}: no enabled config source reads {what}"
                f" (sources: {', '.join(sorted(sources)) or 'none'}; blocked: {blocked})"
            )
    if problems:
        raise ConfigError(problems)
    merged = gather(list(sources.values()), ctx)
    first = ctx.files[0] if ctx.files else None
    source = str(first) if first else "<config>"
    base = first.resolve().parent if first else Path.cwd()
    found = resolve_secrets(merged.data, merged.origins, ctx.env, base)
    if found.problems:
        raise ConfigError(found.problems, source)
    return deployment_from_dict(
        found.data,
        defer=True,
        source=source,
        base_dir=str(base),
        default_name=first.stem if first else "hsu",
        origins=merged.origins,
        secrets=found.values,
        references=found.references,
        previous=previous,
    )


def load(ctx: SourceContext, cli_plugins: Sequence[str] = ()) -> tuple[Deployment, PluginManager]:
    """The deployment and the plugin manager ``hsu run`` would use."""
    boot = PluginManager.load(cli_plugins, env=ctx.env)
    deployment = read_config(boot, ctx)
    if not deployment.plugins:
        return deployment, boot  # the same list: the same plugins, loaded once
    unknown: list[UnknownPlugin] = []
    plugins = PluginManager.load([*deployment.plugins, *cli_plugins], env=ctx.env, unknown=unknown)
    if set(plugins.config_sources()) != set(boot.config_sources()):
        deployment = read_config(plugins, ctx)
    return _with_unknown(deployment, unknown), plugins


def _with_unknown(deployment: Deployment, unknown: list[UnknownPlugin]) -> Deployment:
    """The deployment, its ``plugins:`` entries that name no plugin added to
    its problems (one from ``-p`` or ``HSU_PLUGINS`` is an error at once)."""
    problems = []
    for exc in unknown:
        if exc.name not in deployment.plugins:
            raise exc
        i = deployment.plugins.index(exc.name)
        problems.append(describe(("plugins", i), str(exc), deployment.source, deployment.origins))
    if not problems:
        return deployment
    return attrs.evolve(deployment, problems=(*deployment.problems, *problems))


def effective(deployment: Deployment, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The whole config after defaults, as plain data."""
    return {
        "name": deployment.name,
        "plugins": list(deployment.plugins),
        "units": {
            n: {**converter.unstructure(u), "idle_timeout": u.idle_after}
            for n, u in deployment.units.items()
        },
        **{
            section: converter.unstructure(value) if attrs.has(type(value)) else value
            for section, value in sorted(settings.items())
        },
    }


def show(deployment: Deployment, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every leaf of the effective config with its origin. A value with a
    secret reference shows the reference as written (``${env:TOKEN}``), in
    lists and mappings too; a unit's ``token`` given as is shows ``***``."""
    rows = []
    for path, value in leaves(effective(deployment, settings)):
        shown, secret = _mask(deployment, path, value)
        origin = deployment.origins.get(path, DEFAULT)
        rows.append(
            {
                "path": format_path(path),
                "value": shown,
                "source": str(origin),
                "secret": secret,
            }
        )
    return rows


def _mask(deployment: Deployment, path: PathT, value: Any) -> tuple[Any, bool]:
    """``value`` at ``path`` with what references resolved to replaced: by
    the reference, or ``***`` under one (``command: ${env:X}``, split)."""
    refs = deployment.references
    for n in range(len(path), 0, -1):
        ref = refs.get(path[:n])
        if ref is not None:
            return (ref if n == len(path) else "***"), True
    if len(path) == 3 and path[0] == "units" and path[2] == "token" and value is not None:
        return "***", True
    if isinstance(value, dict):
        items = {k: _mask(deployment, (*path, k), v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(s for _, s in items.values())
    if isinstance(value, list | tuple):
        masked = [_mask(deployment, (*path, i), v) for i, v in enumerate(value)]
        return [v for v, _ in masked], any(s for _, s in masked)
    if isinstance(value, str):
        hidden = redact(value, deployment.secrets)
        return hidden, hidden != value
    return value, False


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        value = row["value"]
        text = value if row["secret"] and isinstance(value, str) else json.dumps(value)
        note = " (secret reference, value not shown)" if row["secret"] else ""
        lines.append(f"{row['path']} = {text}  # {row['source']}{note}")
    return "\n".join(lines)


def validate(
    ctx: SourceContext, cli_plugins: Sequence[str] = ()
) -> tuple[Deployment, dict[str, Any]]:
    """Everything ``hsu run`` checks before it starts anything. No problem
    it reports shows what a secret reference resolved to."""
    from hsu._kernel.kernel import Kernel

    deployment, plugins = load(ctx, cli_plugins)
    try:
        kernel = Kernel(deployment, plugins)
    except ConfigError as exc:
        redacted = [redact(p, deployment.secrets) for p in exc.problems]
        raise ConfigError(redacted, exc.source) from None
    deployment = kernel.deployment  # with the defaults plugins declared
    return deployment, structure_sections(deployment, plugins.settings_classes()) | {
        "kernel": kernel.kernel_settings
    }
