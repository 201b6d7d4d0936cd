"""The defaults plugins declare, filled into a deployment before it is checked.

A unit that names no launcher, balancer or breaker, and a kernel section that
names no registry, get the one a plugin registered with ``default=True``; the
kernel names no plugin. With that plugin blocked (``no:NAME``), a deployment
that needs the capability gets one line per unit saying what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from hsu._kernel.config.model import Deployment, UnitKind, UnitSpec, _DefaultIdle, describe
from hsu.errors import ConfigError

if TYPE_CHECKING:
    from hsu._kernel.plugins import PluginManager


#: unit settings only a watcher acts on (``hsu_register_watchers``), and
#: whether a spec sets each
WATCHED: dict[str, Callable[[UnitSpec], bool]] = {
    # written in the deployment (the default, which only the idle watcher
    # applies, needs none)
    "idle_timeout": lambda spec: (
        not isinstance(spec.idle_timeout, _DefaultIdle) and bool(spec.idle_timeout)
    ),
    "limits": lambda spec: any(
        v is not None
        for v in (
            spec.limits.rss_mb,
            spec.limits.cpu_percent,
            spec.limits.open_files,
            spec.limits.threads,
            spec.limits.children,
        )
    ),
}


def with_defaults(deployment: Deployment, plugins: PluginManager) -> Deployment:
    """``deployment`` with every unnamed capability filled in, or a
    :class:`ConfigError` naming each unit that needs one where none is."""
    problems: list[str] = []

    def need(path: tuple[str | int, ...], kind: str, who: str) -> str | None:
        name = plugins.default(kind)
        if name is None:
            problems.append(
                describe(
                    path,
                    f"{who} needs a {kind}: {plugins.missing(kind)}; name one or enable its plugin",
                    deployment.source,
                    deployment.origins,
                )
            )
        return name

    claimed = {
        setting
        for watcher in plugins.all("watcher").values()
        for setting in getattr(watcher, "settings", ())
    }
    units: dict[str, UnitSpec] = {}
    for unit_name, spec in deployment.units.items():
        changes: dict[str, Any] = {}
        where = ("units", unit_name)
        who = f"unit {unit_name!r}"
        for setting, is_set in WATCHED.items():
            if setting not in claimed and is_set(spec):
                why = "no enabled plugin registers a watcher for it"
                if plugins.blocked:
                    why += f" (blocked: {', '.join(f'no:{n}' for n in sorted(plugins.blocked))})"
                problems.append(
                    describe(
                        (*where, setting),
                        f"{who} sets {setting}, which needs a watcher: {why}; enable its plugin",
                        deployment.source,
                        deployment.origins,
                    )
                )
        if spec.launcher is None and spec.kind is not UnitKind.UNMANAGED:
            changes["launcher"] = need((*where, "launcher"), "launcher", who)
        routing = spec.routing
        if spec.interfaces and (routing.balancer is None or routing.breaker is None):
            routed = f"{who} serves {spec.interfaces[0]!r} and"
            routing = attrs.evolve(
                routing,
                balancer=routing.balancer or need((*where, "routing"), "balancer", routed),
                breaker=routing.breaker or need((*where, "routing"), "breaker", routed),
            )
            changes["routing"] = routing
        if spec.health is None and spec.kind is UnitKind.UNMANAGED and not spec.pidfile:
            # found by address: the supervisor asks the default probe whether
            # something answers there
            need((*where, "health"), "probe", f"{who} (found by address, with no health probe)")
        units[unit_name] = attrs.evolve(spec, **changes) if changes else spec
    sections = dict(deployment.sections)
    kernel = sections.get("kernel")
    if any(s.interfaces for s in units.values()) and not (
        isinstance(kernel, dict) and kernel.get("registry")
    ):
        registry = need(("kernel", "registry"), "registry", "routing to the units' interfaces")
        if registry is not None:
            sections["kernel"] = {
                **(kernel if isinstance(kernel, dict) else {}),
                "registry": registry,
            }
    if problems:
        raise ConfigError(problems, deployment.source)
    return attrs.evolve(deployment, units=units, sections=sections)
