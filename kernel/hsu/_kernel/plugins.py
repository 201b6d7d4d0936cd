"""A typed facade over pluggy: kernel code asks it, never ``pm.hook.*``.

Loading order (first to last), as ``docs/plugins.md`` documents it:

1. essential built-ins (:data:`ESSENTIAL`), which cannot be blocked;
2. default built-ins: the other entry points of the ``hsu`` distribution;
3. the explicit list: ``HSU_PLUGINS``, then the deployment's ``plugins:``, then
   ``-p`` on the command line; ``no:NAME`` anywhere in it blocks ``NAME``;
4. every other entry point in the ``hsu`` group, unless
   ``HSU_DISABLE_PLUGIN_AUTOLOAD`` is set.

Built-ins are entry points of the ``hsu`` distribution itself, so they are
loaded exactly as a third party's plugin is: the default built-ins are
whatever entry points that distribution declares (pyproject.toml), so this
module names no plugin but the essential one.

Plugins register capabilities (launchers, probes, balancers, ...) by kind and
name into one table; a plugin may declare one of its names the default of its
kind (``register(name, obj, default=True)``, as tox's default env runner), and
units that name none get that one. ``no:NAME`` then works for every plugin
but the essential: a deployment that needs a blocked capability is told so.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata as md
import os
import time
import traceback
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy
from loguru import logger

from hsu import hookspecs
from hsu._kernel.aio import await_me_maybe
from hsu.errors import ConflictError, PluginError, PluginLoadError, UnknownPlugin

GROUP = "hsu"
ESSENTIAL: tuple[str, ...] = ("kernel",)
#: the distribution whose entry points are the built-in plugins
BUILTIN_DIST = "hsu"
AUTOLOAD_ENV = "HSU_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "HSU_PLUGINS"
TRACE_ENV = "HSU_TRACE_PLUGINS"

ACTIVE, BLOCKED, FAILED = "active", "blocked", "failed"

#: the kinds of capability, each with the registration hook that fills it
KINDS: Mapping[str, str] = {
    "settings section": "hsu_register_settings",
    "launcher": "hsu_register_launchers",
    "config source": "hsu_register_config_sources",
    "probe": "hsu_register_probes",
    "balancer": "hsu_register_balancers",
    "breaker": "hsu_register_breakers",
    "registry": "hsu_register_registries",
    "placement": "hsu_register_placements",
    "authenticator": "hsu_register_authenticators",
    "authorizer": "hsu_register_authorizers",
    "storage": "hsu_register_storages",
    "cache": "hsu_register_caches",
    "exporter": "hsu_register_exporters",
    "watcher": "hsu_register_watchers",
}
#: kinds that have a default (a settings section or a config source has none)
DEFAULTABLE = (
    "launcher",
    "probe",
    "balancer",
    "breaker",
    "registry",
    "storage",
    "cache",
    "placement",
)


@attrs.define
class PluginInfo:
    """What ``hsu plugins`` shows for one plugin."""

    name: str
    status: str
    source: str
    distribution: str = ""
    version: str = ""
    hooks: list[str] = attrs.field(factory=list)
    error: str = ""
    #: what it registered, by kind: ``{"balancer": ["p2c", "round_robin*"]}``
    #: (``*``: the default of its kind)
    provides: dict[str, list[str]] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def split_plugin_list(items: Iterable[str]) -> tuple[list[str], set[str]]:
    """Split ``["a", "no:b", "c,d"]`` into names to load and names to block."""
    names: list[str] = []
    blocked: set[str] = set()
    for item in items:
        for raw in item.split(","):
            name = raw.strip()
            if not name:
                continue
            if name.startswith("no:"):
                blocked.add(name[3:].strip())
            elif name not in names:
                names.append(name)
    return names, blocked


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("0", "false", "no", "off", "")


class _Pluggy(pluggy.PluginManager):
    """pluggy's manager, quicker to register a module: pluggy looks up each
    name of ``dir(plugin)`` with :func:`inspect.getattr_static` (some 300
    names a plugin module, its imports included); a module's name that holds
    a class, a module or anything not callable is skipped at once, as pluggy
    would skip it (it takes only routines: ``inspect.isroutine``). Anything
    else, a compiled (Cython) function included, goes to pluggy."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if isinstance(plugin, types.ModuleType):
            value = plugin.__dict__.get(name)
            if isinstance(value, type) or not callable(value):
                return None
        return super().parse_hookimpl_opts(plugin, name)


class PluginManager:
    """Loads plugins in the documented order and answers the kernel's questions."""

    def __init__(self) -> None:
        self.pm = _Pluggy(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        #: kind -> name -> (the registered object, the plugin that registered it)
        self._table: dict[str, dict[str, tuple[Any, str]]] = {kind: {} for kind in KINDS}
        #: kind -> (default name, the plugin that declared it)
        self._defaults: dict[str, tuple[str, str]] = {}
        #: names blocked with no:NAME
        self.blocked: set[str] = set()
        self._undo_tracing: Callable[[], None] | None = None

    # -- loading -----------------------------------------------------------

    @classmethod
    def load(
        cls,
        explicit: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        autoload: bool | None = None,
        unknown: list[UnknownPlugin] | None = None,
    ) -> PluginManager:
        """Build a manager the way ``hsu run`` does.

        :param explicit: plugin names in the order given (deployment, then
            ``-p``); ``no:NAME`` blocks. ``HSU_PLUGINS`` from ``env`` comes
            first.
        :param autoload: ``None`` reads ``HSU_DISABLE_PLUGIN_AUTOLOAD``.
        :param unknown: where names that are no plugin at all go, instead of
            raising, so that the rest loads and every problem of a
            deployment is reported at once (``hsu._kernel.config.loader``).
        :raises PluginLoadError: a plugin named explicitly failed to load.
        """
        env = os.environ if env is None else env
        names, blocked = split_plugin_list([env.get(PLUGINS_ENV, ""), *explicit])
        essential_blocked = blocked & set(ESSENTIAL)
        if essential_blocked:
            raise PluginError(
                f"plugin(s) {', '.join(sorted(essential_blocked))} are essential and cannot be"
                " blocked"
            )
        if autoload is None:
            autoload = not _truthy(env.get(AUTOLOAD_ENV))
        self = cls()
        self.blocked = set(blocked)
        if _truthy(env.get(TRACE_ENV)):
            self.enable_tracing()
        eps = _entry_points()
        for name in blocked:
            self.pm.set_blocked(name)
            ep = eps.get(name)
            self._infos[name] = PluginInfo(
                name, BLOCKED, "blocked", *(_dist_of(ep) if ep else ("", ""))
            )
        for name in ESSENTIAL:
            self._load_builtin(name, eps, "essential")
        for name in _builtin_names(eps):
            if name not in blocked and name not in ESSENTIAL:
                self._load_builtin(name, eps, "default")
        for name in names:
            if name in blocked or self.pm.has_plugin(name):
                continue
            try:
                self._load_explicit(name, eps)
            except UnknownPlugin as exc:
                if unknown is None:
                    raise
                unknown.append(exc)
        if autoload:
            for name, ep in eps.items():
                if name in blocked or self.pm.has_plugin(name) or name in self._infos:
                    continue
                self._load_autoload(name, ep)
        return self

    def _load_builtin(self, name: str, eps: Mapping[str, md.EntryPoint], source: str) -> None:
        ep = eps.get(name)
        if ep is None or (ep.dist is not None and _dist_of(ep)[0] != BUILTIN_DIST):
            raise PluginError(
                f"built-in plugin {name!r} has no entry point in the hsu distribution;"
                " is hsu installed (pip install -e .)?"
            )
        self._load_entry_point(name, ep, source)

    def _load_explicit(self, name: str, eps: Mapping[str, md.EntryPoint]) -> None:
        ep = eps.get(name)
        if ep is not None:
            self._load_entry_point(name, ep, "explicit")
            return
        dist, version = _dist_of_module(name)
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
            # the module named, or a package it is in, does not exist (a
            # module it imports missing is that module's failure to load)
            if missing and (name == missing or name.startswith(f"{missing}.")):
                known = ", ".join(sorted(eps)) or "none"
                close = suggest_plugin(name, eps)
                hint = f"; did you mean {close!r}?" if close else ""
                raise UnknownPlugin(
                    f"unknown plugin {name!r}{hint} (no entry point of that name in group"
                    f" {GROUP!r} (installed: {known}) and no module to import)",
                    name,
                    close,
                ) from exc
            raise PluginLoadError(name, dist, version, exc) from exc
        self._register_loaded(module, name, "explicit", dist, version)

    def _load_entry_point(self, name: str, ep: md.EntryPoint, source: str) -> None:
        dist, version = _dist_of(ep)
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginLoadError(name, dist, version, exc) from exc
        self._register_loaded(plugin, name, source, dist, version)

    def _load_autoload(self, name: str, ep: md.EntryPoint) -> None:
        try:
            self._load_entry_point(name, ep, "entrypoint")
        except PluginError as exc:
            cause = exc.__cause__ or exc
            logger.warning(
                "{} (skipped: it was autoloaded). To stop loading it, pass -p no:{} or set"
                " {}=1.\n{}",
                exc,
                name,
                AUTOLOAD_ENV,
                "".join(traceback.format_exception(cause)).rstrip(),
            )
            dist, version = _dist_of(ep)
            self._infos[name] = PluginInfo(
                name, FAILED, "entrypoint", dist, version, error=str(exc)
            )

    def _register_loaded(
        self, plugin: object, name: str, source: str, dist: str | None, version: str | None
    ) -> None:
        try:
            self.register(
                plugin, name, source=source, distribution=dist or "", version=version or ""
            )
        except PluginLoadError:
            raise
        except Exception as exc:
            raise PluginLoadError(name, dist, version, exc) from exc

    def register(
        self,
        plugin: object,
        name: str | None = None,
        *,
        source: str = "code",
        distribution: str = "",
        version: str = "",
    ) -> str:
        """Register a plugin object (module, class or instance) from code.

        Its hookimpls are checked against the specs: a hook name with no spec,
        or a signature that does not match, is an error and the plugin is not
        registered. Its registration hooks run at once.

        :returns: the name it was registered under.
        """
        registered = self.pm.register(plugin, name)
        if registered is None:
            raise PluginError(f"plugin {name!r} is blocked")
        try:
            callers = self.pm.get_hookcallers(plugin) or []
            self._check_pending(plugin, registered, callers)
            self._infos[registered] = PluginInfo(
                registered,
                ACTIVE,
                source,
                distribution,
                version,
                hooks=sorted(h.name for h in callers),
            )
            self._collect(plugin, registered, {h.name for h in callers})
        except Exception:
            self.pm.unregister(plugin)
            self._infos.pop(registered, None)
            self._forget(registered)
            raise
        return registered

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._infos.pop(name, None)
        self._forget(name)

    def _forget(self, name: str) -> None:
        for table in self._table.values():
            for key in [k for k, (_, owner) in table.items() if owner == name]:
                del table[key]
        for kind in [k for k, (_, owner) in self._defaults.items() if owner == name]:
            del self._defaults[kind]

    def _check_pending(self, plugin: object, name: str, callers: Iterable[Any]) -> None:
        for hook in callers:
            if hook.spec is None:
                for impl in hook.get_hookimpls():
                    if impl.plugin is plugin and not impl.optionalhook:
                        raise PluginError(
                            f"plugin {name!r} implements unknown hook {hook.name!r};"
                            " see docs/hooks.md for the hooks hsu calls"
                        )

    # -- registration hooks ------------------------------------------------

    def _collect(self, plugin: object, name: str, own: set[str]) -> None:
        """Run the registration hooks among ``own`` (the hooks the plugin
        implements; most implement one or two of the fourteen)."""
        provides: dict[str, list[str]] = {}
        for kind, hook_name in KINDS.items():
            if hook_name not in own:
                continue

            def register(key: str, value: Any, *, default: bool = False, kind: str = kind) -> None:
                table = self._table[kind]
                if key in table and table[key][1] != name:
                    raise ConflictError(
                        f"Conflicting plugins found: {kind} {key!r} is registered by"
                        f" {self._describe(table[key][1])} and by {self._describe(name)}"
                    )
                if default:
                    self._declare_default(kind, key, name)
                table[key] = (value, name)
                provides.setdefault(kind, []).append(key + ("*" if default else ""))

            self._call_own(plugin, hook_name, register=register)
        self._infos[name].provides = {k: sorted(v) for k, v in provides.items()}

    def _declare_default(self, kind: str, key: str, plugin: str) -> None:
        if kind not in DEFAULTABLE:
            raise PluginError(f"plugin {plugin!r}: a {kind} has no default; drop default=True")
        known = self._defaults.get(kind)
        if known is not None and known[1] != plugin:
            raise ConflictError(
                f"Conflicting plugins found: the default {kind} is {known[0]!r} from"
                f" {self._describe(known[1])} and {key!r} from {self._describe(plugin)}"
            )
        self._defaults[kind] = (key, plugin)

    def _call_own(self, plugin: object, hook_name: str, **kwargs: Any) -> None:
        """Call one plugin's own implementation of a registration hook."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})

    def _describe(self, name: str) -> str:
        info = self._infos.get(name)
        if info and info.distribution:
            return f"plugin {name!r} ({info.distribution} {info.version})"
        return f"plugin {name!r}"

    # -- questions the kernel asks ----------------------------------------

    def get(self, kind: str, name: str | None) -> Any:
        """The object registered as ``name`` of ``kind`` (``None``: the default),
        or a :class:`PluginError` that lists what is registered."""
        if name is None:
            name = self.default(kind)
            if name is None:
                raise PluginError(self.missing(kind))
        try:
            return self._table[kind][name][0]
        except KeyError:
            known = ", ".join(sorted(self._table[kind])) or "none"
            raise PluginError(
                f"no {kind} named {name!r} (registered: {known}); is its plugin enabled?"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._table[kind])

    def all(self, kind: str) -> dict[str, Any]:
        return {name: value for name, (value, _) in self._table[kind].items()}

    def default(self, kind: str) -> str | None:
        """The name a plugin declared the default of ``kind``, if any did."""
        known = self._defaults.get(kind)
        return known[0] if known is not None else None

    def missing(self, kind: str) -> str:
        """Why there is no default ``kind``, for a one-line error."""
        why = f"no enabled plugin registers a default {kind}"
        if self.blocked:
            why += f" (blocked: {', '.join(f'no:{n}' for n in sorted(self.blocked))})"
        return why

    def settings_classes(self) -> dict[str, type[Any]]:
        return self.all("settings section")

    def config_sources(self) -> dict[str, Any]:
        """Registered config sources by name (:class:`hsu.ports.ConfigSource`)."""
        return self.all("config source")

    def launcher(self, name: str | None) -> Any:
        return self.get("launcher", name)

    def launcher_names(self) -> list[str]:
        return self.names("launcher")

    def probe(self, name: str | None) -> Any:
        """The health probe registered as ``name`` (:class:`hsu.ports.Probe`)."""
        return self.get("probe", name)

    def probe_names(self) -> list[str]:
        return self.names("probe")

    def balancer(self, name: str | None) -> Any:
        """The balancer factory registered as ``name`` (:class:`hsu.ports.Factory`)."""
        return self.get("balancer", name)

    def balancer_names(self) -> list[str]:
        return self.names("balancer")

    def breaker(self, name: str | None) -> Any:
        """The circuit breaker factory registered as ``name`` (:class:`hsu.ports.Factory`)."""
        return self.get("breaker", name)

    def breaker_names(self) -> list[str]:
        return self.names("breaker")

    def registry(self, name: str | None) -> Any:
        """The registry factory registered as ``name``: ``factory(kernel) -> Registry``."""
        return self.get("registry", name)

    def registry_names(self) -> list[str]:
        return self.names("registry")

    def placement(self, name: str | None) -> Any:
        """The placement registered as ``name`` (:class:`hsu.ports.Placement`)."""
        return self.get("placement", name)

    def storage(self, name: str | None) -> Any:
        """The storage factory registered as ``name``: ``factory(kernel) -> Storage``."""
        return self.get("storage", name)

    def cache(self, name: str | None) -> Any:
        """The cache factory registered as ``name``: ``factory(kernel) -> Cache``."""
        return self.get("cache", name)

    def infos(self) -> list[PluginInfo]:
        order = {"essential": 0, "default": 1, "explicit": 2, "code": 3, "entrypoint": 4}
        return sorted(self._infos.values(), key=lambda i: (order.get(i.source, 5), i.name))

    def is_active(self, name: str) -> bool:
        return self.pm.has_plugin(name) and not self.pm.is_blocked(name)

    def configure(self, kernel: Any) -> None:
        self.pm.hook.hsu_kernel_configure.call_historic(kwargs={"kernel": kernel})

    def kernel_address(self, kernel: Any, requested: str) -> Any:
        """Where a plugin serving ``requested`` itself moves the kernel: an
        address, a :class:`hsu.ports.DataPlane` or ``None``."""
        address = self.pm.hook.hsu_kernel_address(kernel=kernel, requested=requested)
        return address

    def kernel_handlers(self, kernel: Any) -> list[Any]:
        """Every plugin's extra gRPC handlers for the kernel's server, in hook order."""
        found: list[Any] = []
        for handlers in reversed(self.pm.hook.hsu_kernel_handlers(kernel=kernel)):
            found.extend(handlers or ())
        return found

    def instance_env(self, kernel: Any, unit: str, instance_id: str) -> dict[str, str]:
        """Every plugin's extra environment for one launch (hsu_instance_env)."""
        env: dict[str, str] = {}
        for extra in reversed(
            self.pm.hook.hsu_instance_env(kernel=kernel, unit=unit, instance_id=instance_id)
        ):
            if extra:
                env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def endpoint_removed(self, kernel: Any, endpoint: Any) -> None:
        """Tell plugins that nothing listens at ``endpoint.address`` any more;
        one that raises is logged, the others are still told."""
        given = {"kernel": kernel, "endpoint": endpoint}
        for impl in reversed(self.pm.hook.hsu_endpoint_removed.get_hookimpls()):
            try:
                impl.function(**{k: v for k, v in given.items() if k in impl.argnames})
            except Exception:
                logger.exception("hook hsu_endpoint_removed of {!r} failed", impl.plugin_name)

    def routed_call_impls(self) -> list[Any]:
        """The plugins' ``hsu_routed_call`` implementations (none: the kernel
        builds no record)."""
        impls: list[Any] = self.pm.hook.hsu_routed_call.get_hookimpls()
        return impls

    def routed_call(self, impls: list[Any], kernel: Any, call: Any) -> None:
        """Tell ``impls`` of a routed call that ended; one that raises is
        logged, the others are still told."""
        given = {"kernel": kernel, "call": call}
        for impl in reversed(impls):
            try:
                impl.function(**{k: v for k, v in given.items() if k in impl.argnames})
            except Exception:
                logger.exception("hook hsu_routed_call of {!r} failed", impl.plugin_name)

    async def call_each(
        self,
        hook_name: str,
        *,
        stop_on_error: bool = True,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        """Call a lifecycle hook for every plugin, awaiting each result in turn.

        With ``stop_on_error`` false a failing plugin is logged and the rest
        still run (the stop path must go on). With ``timeout``, all the results
        share one deadline, ``timeout`` seconds from now: one still pending
        then is cancelled and fails with ``TimeoutError``, as does every plugin
        after it (cancelled before it is called).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        hook = getattr(self.pm.hook, hook_name)
        # pluggy's own order: tryfirst, then last registered first, then trylast.
        for impl in reversed(hook.get_hookimpls()):
            if self._undo_tracing is not None:
                logger.info("hook {} -> {}", hook_name, impl.plugin_name)
            if self.pm.is_blocked(self.pm.get_name(impl.plugin) or ""):
                continue
            call_kwargs = {k: v for k, v in kwargs.items() if k in impl.argnames}
            try:
                call = _call(impl.function, call_kwargs)
                if deadline is None:
                    await call
                else:
                    await asyncio.wait_for(call, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if stop_on_error:
                    raise
                logger.warning(
                    "hook {} of plugin {!r} did not return within {:g} s; going on",
                    hook_name,
                    impl.plugin_name,
                    timeout,
                )
            except Exception:
                if stop_on_error:
                    raise
                logger.exception("hook {} of plugin {!r} failed", hook_name, impl.plugin_name)

    # -- tracing -----------------------------------------------------------

    def enable_tracing(self) -> None:
        """Log every hook call and its outcome (``HSU_TRACE_PLUGINS=1``)."""
        if self._undo_tracing is not None:
            return

        def before(
            hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
        ) -> None:
            logger.info("hook {} -> {}", hook_name, [i.plugin_name for i in impls])

        def after(
            outcome: pluggy.Result[Any],
            hook_name: str,
            impls: Sequence[pluggy.HookImpl],
            kwargs: Mapping[str, Any],
        ) -> None:
            exc = outcome.exception
            logger.info("hook {} <- {}", hook_name, f"raised {exc!r}" if exc else "ok")

        self._undo_tracing = self.pm.add_hookcall_monitoring(before, after)


async def _call(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    # the plugin is called in the coroutine: one whose deadline passed before
    # it ran is not called at all (no awaitable is left un-awaited)
    await await_me_maybe(function(**kwargs))


def _builtin_names(eps: Mapping[str, md.EntryPoint]) -> list[str]:
    """The default built-ins: the entry points of the hsu distribution, in the
    order pyproject.toml declares them."""
    return [
        name for name, ep in eps.items() if ep.dist is not None and _dist_of(ep)[0] == BUILTIN_DIST
    ]


#: the package of the built-in plugins (those not loaded by default, such
#: as ``hsu_plugins.gateway.nginx``, are named by module)
BUILTIN_PACKAGE = "hsu_plugins"


def plugin_names(eps: Mapping[str, md.EntryPoint] | None = None) -> list[str]:
    """Every name a deployment may list: entry points, and the modules of
    the built-in plugins package (found without importing them)."""
    import importlib.util
    import pkgutil

    eps = _entry_points() if eps is None else eps
    names = set(eps)
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for info in pkgutil.walk_packages(
            spec.submodule_search_locations, f"{BUILTIN_PACKAGE}.", onerror=lambda _: None
        ):
            if not info.name.rpartition(".")[2].startswith("_"):
                names.add(info.name)
    return sorted(names)


def _plain(name: str) -> str:
    """A name as a user may misremember it: ``hsu_plugins.gateway.nginx``
    and ``gateway_nginx`` are the same."""
    name = name.lower().replace("-", "_").removeprefix(f"{BUILTIN_PACKAGE}.")
    return name.replace(".", "_")


def suggest_plugin(name: str, eps: Mapping[str, md.EntryPoint] | None = None) -> str:
    """The known plugin name closest to ``name`` ("" if none is close)."""
    import difflib

    known = plugin_names(eps)
    by_plain: dict[str, str] = {}
    for k in known:
        by_plain.setdefault(_plain(k), k)
    close = difflib.get_close_matches(_plain(name), list(by_plain), n=1, cutoff=0.75)
    return by_plain[close[0]] if close else ""


def _entry_points() -> dict[str, md.EntryPoint]:
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


#: (name, version) by distribution: reading METADATA parses a whole email
#: message, and every built-in plugin comes from the same distribution
_dists: dict[str, tuple[str, str]] = {}


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "", ""
    key = str(getattr(dist, "_path", "")) or repr(dist)
    known = _dists.get(key)
    if known is None:
        known = _dists[key] = _name_version(dist)
    return known


def _name_version(dist: md.Distribution) -> tuple[str, str]:
    """The distribution's Name and Version, read from the metadata's headers
    without the email parser that ``dist.metadata`` imports."""
    found: dict[str, str] = {}
    for line in (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").splitlines():
        if not line.strip():
            break  # the headers end at the first empty line
        key, sep, value = line.partition(":")
        if sep and key in ("Name", "Version"):
            found.setdefault(key, value.strip())
    if len(found) < 2:
        meta = dist.metadata
        return meta["Name"] or dist.name, meta["Version"] or dist.version
    return found["Name"], found["Version"]


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    # scans every installed distribution's RECORD: once per process
    return md.packages_distributions()


def _dist_of_module(module: str) -> tuple[str | None, str | None]:
    top = module.split(".")[0]
    dists = _packages_distributions().get(top)
    if not dists:
        return None, None
    try:
        return dists[0], md.version(dists[0])
    except md.PackageNotFoundError:
        return dists[0], None
