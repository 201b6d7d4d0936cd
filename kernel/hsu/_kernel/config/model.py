"""The deployment: its schema as frozen attrs classes and the one converter.

A deployment file holds ``name``, ``plugins``, ``units`` and one section per
plugin, keyed by the name the plugin registered its settings class under. Raw
data becomes typed objects only here, at the edge; every problem found is
reported at once with its path and source.
"""

from __future__ import annotations

import enum
import json
import pickle
import re
import shlex
import signal
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override

from hsu._kernel.config.sources import MIN_SECRET_LENGTH, format_path, origin_of
from hsu._kernel.supervision.resources import ResourceLimits
from hsu.config import (
    DEFAULT_PASS_ENV,
    DeferredOrigins,
    EnvFileError,
    Seconds,
    parse_duration,
    read_env_file,
    redact,
)
from hsu.errors import ConfigError, InvalidValue
from hsu.ports import Origin, PathT

CORE_KEYS = ("name", "plugins", "units")
#: a unit's name: it becomes part of instance ids, file names and log lines
UNIT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: a deployment's name: it names the state folder ``.hsu/<name>``
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: an unmanaged unit's ``token``: what its instances send as gRPC metadata
TOKEN = re.compile(r"[!-~]{16,}")


class LogFormat(enum.StrEnum):
    TEXT = "text"
    #: one JSON object a line (loguru's serializer)
    JSON = "json"


class StartMode(enum.StrEnum):
    ON_DEMAND = "on-demand"
    AT_START = "at-start"


class Placement(enum.StrEnum):
    #: any kernel runs instances of it, at start or on demand
    ANY = "any"
    #: one instance in the whole cluster: it runs only where a plugin (such as
    #: hsu-plugin-etcd's leadership) scales it up; never at start or on demand
    SINGLETON = "singleton"


class UnitKind(enum.StrEnum):
    #: any executable; ready once running (or once its health probe passes)
    MANAGED = "managed"
    #: speaks hsu's Core interface and registers itself; ready once registered
    INTEGRATED = "integrated"
    #: a process hsu did not start, attached by ``pidfile`` or ``address``
    UNMANAGED = "unmanaged"


class RestartPolicy(enum.StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class BreakerAction(enum.StrEnum):
    #: stay ``fatal`` until started by hand (``hsu start``) or a reload
    FATAL = "fatal"
    #: stay ``fatal`` for ``cooldown`` seconds, then try once (half-open)
    COOLDOWN = "cooldown"


def _command_given(value: Any) -> tuple[str, ...]:
    argv = _command(value)
    if not argv:
        raise ValueError("must not be empty")
    return argv


def _command(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        argv = list(value)
    else:
        raise ValueError(f"expected a string or a list of strings, got {value!r}")
    # one string for the same word in every unit (``python``, ``-m``), kept as long as they run
    return tuple(sys.intern(a) if type(a) is str else a for a in argv)


_ge0: Any = attrs.validators.ge(0)
_gt0: Any = attrs.validators.gt(0)


@attrs.frozen
class Backoff:
    """Delay before restart number n of a failure streak.

    The first restart is immediate; then ``initial * multiplier**(n-2)``,
    capped at ``max``, spread by +-``jitter`` (a fraction). A streak ends once
    an instance stays ready for ``reset_after`` seconds.
    """

    initial: Seconds = attrs.field(default=0.5, validator=_ge0)
    multiplier: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    max: Seconds = attrs.field(default=30.0, validator=_ge0)
    jitter: float = attrs.field(default=0.1, validator=[_ge0, attrs.validators.le(1)])
    reset_after: Seconds = attrs.field(default=10.0, validator=_ge0)


@attrs.frozen
class CrashLoop:
    """The breaker: ``max_failures`` within ``window`` seconds trips it."""

    max_failures: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    window: Seconds = attrs.field(default=60.0, validator=_gt0)
    action: BreakerAction = BreakerAction.FATAL
    cooldown: Seconds = attrs.field(default=30.0, validator=_ge0)


@attrs.frozen
class Restart:
    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    backoff: Backoff = attrs.field(factory=Backoff)
    crash_loop: CrashLoop = attrs.field(factory=CrashLoop)


@attrs.frozen
class Health:
    """A health probe (a plugin, see ``hsu plugins``) run while an instance is up."""

    probe: str
    interval: Seconds = attrs.field(default=5.0, validator=_gt0)
    timeout: Seconds = attrs.field(default=1.0, validator=_gt0)
    #: consecutive failures that make an instance unhealthy (it is replaced)
    failure_threshold: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    #: consecutive successes that make a starting instance ready
    success_threshold: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: seconds after start before the first probe
    initial_delay: Seconds = attrs.field(default=0.0, validator=_ge0)
    #: the probe's own options, checked by the probe
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Autoscale:
    """Scale between ``min_instances`` and ``max_instances`` on calls in flight.

    Off unless ``above`` is set. One instance is added when the average calls
    in flight per ready instance reach ``above``; one is removed when it has
    stayed at or below ``below`` for ``cooldown`` seconds. Two scalings are at
    least ``cooldown`` seconds apart.
    """

    above: float | None = attrs.field(default=None)
    below: float = attrs.field(default=0.5, validator=_ge0)
    cooldown: Seconds = attrs.field(default=10.0, validator=_ge0)
    #: seconds between looks at the load
    interval: Seconds = attrs.field(default=1.0, validator=_gt0)


@attrs.frozen
class Queue:
    """The unit's queue of calls waiting for a slot (``routing.max_inflight``).

    Calls wait by priority (metadata ``hsu-priority``, higher first), FIFO
    within one; a call that has waited ``max_age`` seconds goes before any
    younger one, whatever its priority, so the lowest is never starved.
    """

    #: calls (and leases) waiting at most; one more is RESOURCE_EXHAUSTED
    max: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    #: seconds after which a waiting call goes first, whatever its priority
    max_age: float = attrs.field(default=10.0, validator=_gt0)
    #: seconds a call without a deadline waits at most
    timeout: float = attrs.field(default=30.0, validator=_gt0)


_METADATA_KEY = re.compile(r"[a-z0-9_.-]+")


def _method_patterns(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("must name at least one method (Method, pkg.Service/Method or a glob)")
    for m in value:
        if not m or len(m) > 256 or m.startswith("/") or any(c.isspace() for c in m):
            raise ValueError(f"{m!r}: a method is Method, pkg.Service/Method or a glob")


def _metadata_keys(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    for k in value:
        if not _METADATA_KEY.fullmatch(k) or len(k) > 128:
            raise ValueError(f"{k!r}: a metadata key is lower case [a-z0-9_.-], at most 128")
        if k.startswith(("grpc-", "hsu-identity")) or k in ("authorization",):
            raise ValueError(f"{k!r}: the transport's or the kernel's own, not a caller's")


@attrs.frozen
class ResponseCache:
    """Replies of a unit's unary methods kept for ``ttl`` (docs/cache.md):
    a repeated call (same method, request bytes and ``key_metadata`` values)
    is answered from the cache without reaching an instance. Only OK replies
    are kept."""

    #: ``Method``, ``pkg.Service/Method`` or a glob; only unary ones are cached
    methods: tuple[str, ...] = attrs.field(validator=_method_patterns)
    #: how long a reply is served from the cache
    ttl: Seconds = attrs.field(default=30.0, validator=[_gt0, attrs.validators.le(86400 * 7)])
    #: metadata whose values are part of the key (a reply per tenant)
    key_metadata: tuple[str, ...] = attrs.field(default=(), validator=_metadata_keys)


@attrs.frozen
class Routing:
    """How calls to a unit's interfaces are routed (``docs/routing.md``)."""

    #: a balancer plugin (``hsu plugins``): round_robin, weighted_round_robin,
    #: least_inflight, random, p2c, ring_hash, maglev, ...
    #: (none: the default a plugin declared; built in, round_robin)
    balancer: str | None = None
    balancer_options: Mapping[str, Any] = attrs.field(factory=dict)
    #: a call's hash key is the value of this metadata key (ring_hash, maglev)
    hash_key: str = "hsu-key"
    #: a circuit breaker plugin: consecutive, ratio, none
    #: (none: the default a plugin declared; built in, consecutive)
    breaker: str | None = None
    breaker_options: Mapping[str, Any] = attrs.field(factory=dict)
    #: methods that are safe to call twice, retried on UNAVAILABLE:
    #: ``Method``, ``pkg.Service/Method`` or ``"*"``
    idempotent: tuple[str, ...] = ()
    #: tries per call, the first included
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    #: retries a caller may make, as a share of its calls, plus a floor per second
    retry_budget: float = attrs.field(default=0.2, validator=_ge0)
    retry_min_per_second: float = attrs.field(default=10.0, validator=_ge0)
    #: seconds a stopping instance gets to finish its calls in flight
    drain_timeout: Seconds = attrs.field(default=10.0, validator=_ge0)
    autoscale: Autoscale = attrs.field(factory=Autoscale)
    #: calls at a time on one instance (none: unlimited); the rest queue
    max_inflight: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    queue: Queue = attrs.field(factory=Queue)
    #: replies kept in the kernel's cache (and a caller's ``hsu.connect``)
    cache: ResponseCache | None = None


def _signal_name(value: str) -> str:
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in signal.Signals.__members__:
        raise ValueError(f"unknown signal {value!r}")
    return sys.intern(name)  # one ``SIGTERM`` for every unit


#: seconds an on-demand unit's instance may go unused before it stops, when
#: the deployment does not say (docs/configuration.md says why 5 minutes)
DEFAULT_IDLE_TIMEOUT = 300.0


class _DefaultIdle(float):
    """The default idle timeout, told apart from the same number written in
    a deployment (which applies to any unit)."""


IDLE_DEFAULT = _DefaultIdle(DEFAULT_IDLE_TIMEOUT)


def _shared(cls: Callable[[], Any]) -> Callable[[], Any]:
    """A factory that gives the one default instance of a frozen class to
    every unit that does not set it (1,000 units held 1,000 equal copies)."""
    one = cls()
    return lambda: one


@attrs.frozen
class UnitSpec:
    """One kind of HSU: how to start it, what it serves, how it is kept alive.

    ``command[0] == "python"`` means the interpreter running the kernel, so
    HSUs share its virtual environment.
    """

    command: tuple[str, ...] = attrs.field(default=(), converter=_command)
    args: tuple[str, ...] = ()
    kind: UnitKind = UnitKind.INTEGRATED
    interfaces: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: a dotenv file (relative to the deployment's folder) whose variables
    #: the instances get, under ``env``; read as each instance starts
    env_file: str | None = None
    cwd: str | None = None
    start: StartMode = StartMode.ON_DEMAND
    #: ``singleton``: one instance cluster-wide, started by a leadership plugin
    placement: Placement = Placement.ANY
    #: instances kept running at all times (at least 1 for ``start: at-start``)
    min_instances: int = attrs.field(default=0, validator=_ge0)
    max_instances: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: seconds an instance above ``min_instances`` may go unused before it
    #: stops; ``null`` or 0: never. Unset: :data:`DEFAULT_IDLE_TIMEOUT` for an
    #: integrated unit the kernel starts on demand, never for the rest (see
    #: :attr:`idle_after`)
    idle_timeout: Seconds | None = attrs.field(default=IDLE_DEFAULT)
    #: a launcher plugin; none: the default a plugin declared (built in, subprocess)
    launcher: str | None = None
    #: seconds from spawn to ready before the start counts as failed
    startup_timeout: Seconds = attrs.field(default=30.0, validator=_gt0)
    #: sent when Core.Shutdown is not available (``managed`` units, or no answer)
    stop_signal: str = attrs.field(default="SIGTERM", converter=_signal_name)
    #: seconds an instance has to exit after being asked, before SIGKILL
    stop_grace: Seconds = attrs.field(default=10.0, validator=_ge0)
    restart: Restart = attrs.field(factory=_shared(Restart))
    health: Health | None = None
    limits: ResourceLimits = attrs.field(factory=_shared(ResourceLimits))
    #: units started (and ready) before this one, stopped after it
    depends_on: tuple[str, ...] = ()
    #: ``unmanaged``: where to find the process and whether hsu may stop it
    pidfile: str | None = None
    address: str | None = None
    allow_kill: bool = False
    #: ``unmanaged``: the credential its instances present when they register
    #: (normally ``${env:NAME}``); at least 16 printable ASCII characters.
    #: Instances the kernel starts get their own, one per instance
    token: str | None = None
    routing: Routing = attrs.field(factory=_shared(Routing))
    #: glob patterns (``fnmatch``) of the kernel's environment variables the
    #: instances inherit; the default is :data:`hsu.config.DEFAULT_PASS_ENV`,
    #: ``["*"]`` passes everything. ``env`` is added on top
    pass_env: tuple[str, ...] = DEFAULT_PASS_ENV

    #: what the JSON Schema adds: only an unmanaged unit may leave out ``command``
    __json_schema_extra__: ClassVar[dict[str, Any]] = {
        "if": {"properties": {"kind": {"const": "unmanaged"}}, "required": ["kind"]},
        "else": {"required": ["command"]},
    }

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.command, *self.args)

    @property
    def idle_after(self) -> float | None:
        """The idle timeout in effect: ``idle_timeout`` as written (0: none),
        else the default for an HSU the kernel starts on demand (``start:
        on-demand``, ``placement: any``, ``kind: integrated``: it reports its
        calls in flight, so the kernel sees it in use whoever calls it), else
        none."""
        t = self.idle_timeout
        if isinstance(t, _DefaultIdle):
            on_demand = (
                self.start is StartMode.ON_DEMAND
                and self.placement is Placement.ANY
                and self.kind is UnitKind.INTEGRATED
            )
            return DEFAULT_IDLE_TIMEOUT if on_demand else None
        return t or None

    @property
    def initial_instances(self) -> int:
        """How many instances run once the kernel is up."""
        if self.placement is Placement.SINGLETON:
            return 0  # the leadership plugin starts it where it leads
        if self.start is StartMode.AT_START:
            return max(1, self.min_instances)
        return self.min_instances


class Secrets(frozenset[str]):
    """Every value a ``${env:..}``/``${file:..}`` reference resolved to (and
    every unit ``token``) of at least ``MIN_SECRET_LENGTH`` (4) characters:
    what :func:`hsu.config.redact` hides from logs and messages."""

    def redact(self, text: str) -> str:
        """``text`` with each of these values replaced by ``***`` (the pattern
        compiled once: this runs on every line an HSU writes)."""
        if not self:
            return text
        pattern = _SECRET_PATTERNS.get(self)
        if pattern is None:
            values = sorted(self, key=len, reverse=True)
            pattern = re.compile("|".join(re.escape(v) for v in values))
            _SECRET_PATTERNS[self] = pattern
        return pattern.sub("***", text)


#: compiled redaction patterns by secret set (a deployment and its reloads)
_SECRET_PATTERNS: weakref.WeakKeyDictionary[Secrets, re.Pattern[str]] = weakref.WeakKeyDictionary()


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
    #: the values secret references resolved to (never shown; see :class:`Secrets`)
    secrets: Secrets = attrs.field(factory=Secrets, repr=False, eq=False)
    #: path -> the string as written, for each value with a secret reference
    references: Mapping[PathT, str] = attrs.field(factory=dict, repr=False, eq=False)
    #: problems found while reading it (``deployment_from_dict(defer=True)``),
    #: reported together with those found once its plugins are loaded; a
    #: kernel is never built from a deployment that has any
    problems: tuple[str, ...] = attrs.field(default=(), repr=False, eq=False)
    #: unit name -> a digest of the variables its ``env_file`` held when
    #: this was read (a reload restarts a unit whose file changed)
    env_files: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: unit name -> its raw mapping as read, pickled (:func:`unit_key`): a
    #: reload reuses the structured unit when it is the same
    unit_keys: Mapping[str, bytes] = attrs.field(factory=dict, repr=False, eq=False)


def make_converter() -> cattrs.Converter:
    """One converter for the whole deployment: strict, no unknown keys."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    conv.register_structure_hook_func(lambda t: t == str | tuple[str, ...], _structure_str_or_tuple)
    conv.register_structure_hook(float, _strict_number(float))
    conv.register_structure_hook(int, _strict_number(int))
    conv.register_structure_hook(str, _strict_str)
    # after str: a StrEnum is a str, and singledispatch takes the nearest class
    conv.register_structure_hook(enum.StrEnum, _strict_enum)
    conv.register_structure_hook(bool, _strict_bool)
    # after float: a number of seconds may be written 500ms, 5s, 2m
    conv.register_structure_hook_func(lambda t: t == Seconds, lambda v, _: parse_duration(v))
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Any], _structure_mapping)
    conv.register_structure_hook(
        UnitSpec,
        make_dict_structure_fn(
            UnitSpec,
            conv,
            _cattrs_forbid_extra_keys=True,
            command=override(struct_hook=lambda v, _: _command_given(v)),
            stop_signal=override(struct_hook=lambda v, _: _signal_name(_strict_str(v, str))),
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


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _structure_mapping(value: Any, _: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"expected a mapping, got {value!r}")
    return dict(value)


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _structure_str_or_tuple(value: Any, _: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a string or a list of strings, got {value!r}")


def _structure_str_tuple(value: Any, _: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a list of strings, got item {item!r}")
    return tuple(value)


converter = make_converter()


def _suggest(key: str, valid: list[str]) -> str:
    import difflib  # not at start (docs/benchmarks.md, Footprint)

    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _suggest_plugin(section: str, names: Iterable[str]) -> str:
    """``gateway_nginx`` -> enable ``hsu_plugins.gateway.nginx``: a plugin
    not enabled whose name is the section's."""
    plain = section.replace("-", "_").lower()
    for name in names:
        if name.removeprefix("hsu_plugins.").replace(".", "_").lower() == plain:
            return f"; is it the section of plugin {name!r}? enable it: plugins: [{name}]"
    return ""


def _messages(exc: BaseException, path: PathT, raw: Any = None) -> list[tuple[PathT, str]]:
    """Flatten a cattrs error into one (path, message) per problem; with the
    ``raw`` data, a validator's refusal is put at its field."""
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
            inner = None
            if isinstance(raw, Mapping) and name is not None:
                inner = raw.get(name)
            elif isinstance(raw, list | tuple) and isinstance(part, int) and part < len(raw):
                inner = raw[part]
            out.extend(_messages(sub, (*path, part), inner))
        refused = [s for s in without_notes if not isinstance(s, ForbiddenExtraKeysError)]
        placed: list[tuple[PathT, str]] = []
        if isinstance(exc, ClassValidationError) and isinstance(raw, Mapping):
            # every validator, not only the first to fail, nor none when a
            # nested value failed first (attrs never ran them then)
            seen = {p for p, _ in out}
            placed = [(p, m) for p, m in _validator_problems(exc.cl, raw, path) if p not in seen]
        out.extend(placed)
        for sub in without_notes:
            if not (placed and sub in refused):
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
        found = _messages(exc, path, data)
        problems = [describe(p, m, source, {} if origins is None else origins) for p, m in found]
        raise ConfigError(problems, source) from None


def structure_options(
    owner: Any,
    raw: Any,
    path: PathT,
    source: str = "<options>",
    origins: Mapping[PathT, Origin] | None = None,
) -> Any:
    """A unit's raw options for a probe, balancer or breaker (``owner``), as
    an instance of ``owner.options``, its attrs class.

    The one place plugin options are checked: when a deployment is loaded
    (:func:`check_units`), where a route builds its balancer and breakers (in
    the kernel and in ``hsu.connect``), and before each health probe. Raises
    :class:`ConfigError` listing every problem, at ``path`` plus the key.
    """
    cls = owner.options
    raw = {} if raw is None else raw
    try:
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a mapping, got {raw!r}")
        return converter.structure(raw, cls)
    except Exception as exc:
        found: list[tuple[PathT, str]] = []
        if isinstance(exc, ClassValidationError) and exc.cl is cls:
            with_notes, without_notes = exc.group_exceptions()
            for sub, note in with_notes:
                found.extend(_messages(sub, (*path, note.name)))
            refused = []
            for sub in without_notes:
                if isinstance(sub, ForbiddenExtraKeysError) and not attrs.fields(cls):
                    found.extend(
                        ((*path, k), "unknown key (takes no options)")
                        for k in sorted(sub.extra_fields)
                    )
                elif isinstance(sub, ForbiddenExtraKeysError):
                    found.extend(_messages(sub, path))
                else:  # the class refused the values
                    refused.append((path, str(sub)))
            found.extend(_validator_problems(cls, raw, path) or refused)
        else:
            found = _messages(exc, path)
        problems = [describe(p, m, source, {} if origins is None else origins) for p, m in found]
        raise ConfigError(problems, source) from None


#: attrs' number validators say ``'replicas' must be >= 1: 0``
_ATTRS_BOUND = re.compile(r"(must be (?:<|<=|>|>=) \S+): (.*)")


def _validator_problems(
    cls: type[Any], raw: Mapping[str, Any], path: PathT
) -> list[tuple[PathT, str]]:
    """Every validator of ``cls`` that ``raw`` fails, each at its field (attrs
    stops at the first one that fails). A value of the wrong type is reported
    by the converter; its field is skipped here, and others see its default."""
    try:
        attrs.resolve_types(cls)
    except NameError:  # an annotation not importable here: the caller says why
        return []
    obj = object.__new__(cls)
    fields = attrs.fields(cls)
    typed: set[str] = set()
    for f in fields:
        value: Any = f.default
        if isinstance(value, attrs.Factory):  # type: ignore[arg-type]
            value = value.factory(obj) if value.takes_self else value.factory()
        if f.name in raw:
            try:
                value = converter.structure(raw[f.name], f.type)
                typed.add(f.name)
            except Exception:
                pass
        else:
            typed.add(f.name)
        object.__setattr__(obj, f.name, value)
    out: list[tuple[PathT, str]] = []
    for f in fields:
        if f.validator is None or f.name not in typed or getattr(obj, f.name) is attrs.NOTHING:
            continue
        try:
            f.validator(obj, f, getattr(obj, f.name))
        except Exception as exc:
            message = str(exc.args[0]) if exc.args else type(exc).__name__
            message = message.removeprefix(f"'{f.name}' ")
            bound = _ATTRS_BOUND.fullmatch(message)
            if bound:
                message = f"{bound[1]}, got {bound[2]}"
            out.append(((*path, f.name), message))
    return out


def load_deployment(path: str | Path) -> Deployment:
    """Read one deployment file (YAML, JSON or TOML) with no other source."""
    from hsu.config import read_file

    path = Path(path)
    layer = read_file(path)
    return deployment_from_dict(
        layer.data,
        source=str(path),
        base_dir=str(path.resolve().parent),
        default_name=path.stem,
        origins=layer.origins,
    )


def unit_key(raw: Any) -> bytes | None:
    """A unit's raw mapping as bytes that are equal only if the mappings are
    the same, types included (``1``, ``1.0`` and ``true`` are equal in
    Python; a value a secret reference resolved to is not a plain string):
    pickled, some 150 bytes a unit, compared as they are (no hash to
    collide); None if it is not plain data."""
    try:
        return pickle.dumps(raw, pickle.HIGHEST_PROTOCOL)
    except Exception:  # a config source may produce anything
        return None


def deployment_from_dict(
    raw: Any,
    *,
    source: str = "<dict>",
    base_dir: str = ".",
    default_name: str = "hsu",
    origins: Mapping[PathT, Origin] | None = None,
    secrets: Iterable[str] = (),
    references: Mapping[PathT, str] | None = None,
    defer: bool = False,
    previous: Deployment | None = None,
) -> Deployment:
    """A typed :class:`Deployment` from plain data, or a :class:`ConfigError`
    listing every problem. ``secrets`` are the values references resolved
    to and ``references`` where they were (:func:`resolve_secrets`): no
    message shows one, and none may be in a unit's command line.

    With ``defer``, problems do not raise: the deployment holds what was
    valid and lists them in ``problems``, so that loading its plugins and
    checking their sections can report theirs in the same error.

    ``previous`` (the running deployment, on a reload): a unit whose raw
    mapping is the same as when ``previous`` was read is not structured
    again; its unit there is taken as it is (with the defaults its plugins
    filled in, which :func:`~hsu._kernel.config.defaults.with_defaults`
    leaves as they are). Nothing else a unit depends on is cached: its
    ``env_file`` is read again, and secret references resolve before this."""
    origins = {} if origins is None else origins
    references = references or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping at the top, got {type(raw).__name__}"])
    problems: list[str] = []
    name = raw.get("name", default_name)
    if not isinstance(name, str):
        problems.append(describe(("name",), f"expected a string, got {name!r}", source, origins))
    elif not DEPLOYMENT_NAME.fullmatch(name):
        given = "" if "name" in raw else " (from the file name; set name: to choose one)"
        problems.append(
            describe(
                ("name",),
                f"{name!r} is not a valid deployment name{given}: use letters, digits, '.',"
                " '-' and '_', starting with a letter or digit, at most 63 characters",
                source,
                origins,
            )
        )
    plugins: tuple[str, ...] = ()
    units: dict[str, UnitSpec] = {}
    keys: dict[str, bytes] = {}
    before = previous.unit_keys if previous is not None else {}
    reusable = previous.units if previous is not None else {}
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
        path = ("units", str(unit_name))
        if not UNIT_NAME.fullmatch(str(unit_name)):
            problems.append(
                describe(
                    path,
                    f"{str(unit_name)!r} is not a valid unit name: use a-z, 0-9, '-' and '_',"
                    " starting with a letter or digit, at most 63 characters",
                    source,
                    origins,
                )
            )
            continue
        key = unit_key(spec)
        if key is not None and before.get(path[1]) == key and path[1] in reusable:
            units[path[1]] = reusable[path[1]]
            keys[path[1]] = key
            continue
        if isinstance(spec, dict) and "command" not in spec and spec.get("kind") != "unmanaged":
            problems.append(describe((*path, "command"), "required key missing", source, origins))
            key = None
        try:
            units[path[1]] = structure(spec, UnitSpec, path, source, origins)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if key is not None:
            keys[path[1]] = key
    problems.extend(_unit_secret_problems(units, references, source, origins))
    env_files: dict[str, str] = {}
    for unit_name, unit in units.items():
        if unit.env_file is not None:
            try:
                env_files[unit_name] = env_file_digest(read_unit_env_file(unit, base_dir))
            except EnvFileError as exc:
                problems.append(
                    describe(("units", unit_name, "env_file"), str(exc), source, origins)
                )
    values = {*secrets, *(u.token for u in units.values() if u.token)}
    kept = Secrets(v for v in values if len(v) >= MIN_SECRET_LENGTH)
    if problems and not defer:
        raise ConfigError([redact(p, kept) for p in problems], source)
    sections = {k: v for k, v in raw.items() if k not in CORE_KEYS}
    if not isinstance(name, str) or not DEPLOYMENT_NAME.fullmatch(name):
        name = "invalid"  # reported in problems: never used to run anything
    return Deployment(
        problems=tuple(redact(p, kept) for p in problems),
        name=name,
        plugins=plugins,
        units=units,
        sections=sections,
        source=source,
        base_dir=base_dir,
        origins=origins if isinstance(origins, DeferredOrigins) else dict(origins),
        secrets=kept,
        references=dict(references),
        env_files=env_files,
        unit_keys=keys,
    )


def read_unit_env_file(unit: UnitSpec, base_dir: str) -> dict[str, str]:
    """The variables of ``unit``'s ``env_file`` (none without one), read now;
    raises :class:`hsu.config.EnvFileError` naming the file as written and
    the line."""
    if unit.env_file is None:
        return {}
    return read_env_file(Path(base_dir, unit.env_file), unit.env_file)


def env_file_digest(variables: Mapping[str, str]) -> str:
    """What tells one env file's variables from another's, without keeping them."""
    import hashlib  # not at start (docs/benchmarks.md, Footprint)

    return hashlib.sha256(json.dumps(dict(variables), sort_keys=True).encode()).hexdigest()


#: where a secret must not be: the argv of a process is readable by every
#: local user in ``/proc/PID/cmdline``
_COMMAND_LINE = ("command", "args")


def _unit_secret_problems(
    units: Mapping[str, UnitSpec],
    references: Mapping[PathT, str],
    source: str,
    origins: Mapping[PathT, Origin],
) -> list[str]:
    """No secret reference in a command line; a ``token`` only on an
    unmanaged unit, and one long enough to guess no sooner than a key."""
    problems: list[str] = []
    found = sorted(
        {p[:3] for p in references if len(p) >= 3 and p[0] == "units" and p[2] in _COMMAND_LINE},
        key=str,
    )
    for path in found:
        problems.append(
            describe(
                path,
                "secret references are not allowed in the command line (visible in"
                " /proc/PID/cmdline); pass it in env or a file",
                source,
                origins,
            )
        )
    for name, spec in units.items():
        if spec.token is None:
            continue
        where = ("units", name, "token")
        if spec.kind is not UnitKind.UNMANAGED:
            problems.append(
                describe(
                    where,
                    "only an unmanaged unit takes a token; the instances the kernel starts"
                    " get their own",
                    source,
                    origins,
                )
            )
        elif not TOKEN.fullmatch(spec.token):
            problems.append(
                describe(
                    where,
                    f"must be at least 16 printable ASCII characters without spaces"
                    f" (got {len(spec.token)} characters)",
                    source,
                    origins,
                )
            )
    return problems


#: settings class -> whether :func:`_all_defaults` holds for it
_defaulted: dict[type[Any], bool] = {}


def _all_defaults(cls: type[Any]) -> bool:
    """Whether ``cls`` is an attrs class whose every field has a default:
    then ``cls()`` is what cattrs makes of an absent (empty) section, without
    generating cattrs' structure function for it (most of a deployment's
    plugin sections are absent; each cost 1-2 ms at the kernel's start)."""
    known = _defaulted.get(cls)
    if known is None:
        known = _defaulted[cls] = attrs.has(cls) and all(
            f.default is not attrs.NOTHING or not f.init for f in attrs.fields(cls)
        )
    return known


def structure_sections(
    deployment: Deployment,
    classes: Mapping[str, type[Any]],
    plugin_names: Callable[[], Iterable[str]] | None = None,
) -> dict[str, Any]:
    """Type every plugin section; sections no plugin registered are errors,
    with the closest registered section suggested, else a plugin not
    enabled whose name matches (``plugin_names``: every plugin a deployment
    may list)."""
    problems: list[str] = []
    settings: dict[str, Any] = {}
    valid = [*CORE_KEYS, *classes]
    origins = deployment.origins
    for key in deployment.sections:
        if key not in classes:
            hint = _suggest(key, valid)
            if not hint and plugin_names is not None:
                hint = _suggest_plugin(key, plugin_names())
            problems.append(
                describe(
                    (key,),
                    f"no enabled plugin has a settings section of this name{hint}",
                    deployment.source,
                    origins,
                )
            )
    for section, cls in classes.items():
        data = deployment.sections.get(section)
        try:
            settings[section] = (
                structure(data or {}, cls, (section,), deployment.source, origins)
                if data or not _all_defaults(cls)
                else cls()
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, deployment.source)
    return settings


@attrs.frozen
class TLSSettings:
    """``kernel.tls``: TLS, and with ``client_ca`` mutual TLS, on the data
    plane and on a TCP control plane (a unix control socket stays plaintext:
    its file mode guards it). Paths are relative to the deployment file; the
    files are read again when they change, so a rotated certificate is served
    to new connections without a restart."""

    #: PEM certificate chain the kernel presents (its leaf first)
    cert: str
    #: PEM private key of ``cert``
    key: str
    #: PEM bundle of the CAs whose client certificates are accepted (mTLS)
    client_ca: str | None = None
    #: refuse a client without a certificate from ``client_ca``; default: true
    #: when ``client_ca`` is given (grpcio either requires and verifies a
    #: client certificate or does not ask for one)
    require_client_cert: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.require_client_cert and not self.client_ca:
            raise ValueError("require_client_cert: true needs client_ca (the CAs to verify with)")
        if self.client_ca and self.require_client_cert is False:
            raise ValueError(
                "client_ca with require_client_cert: false: grpcio cannot ask for an optional"
                " client certificate; leave require_client_cert out or drop client_ca"
            )

    @property
    def mutual(self) -> bool:
        """Client certificates are required and verified against ``client_ca``."""
        return self.client_ca is not None


def _listen_address(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """:func:`hsu.validate.listen_address`, as a field's validator (its
    message without the field: the path says where)."""
    from hsu import validate

    if value is None:
        return
    try:
        validate.listen_address(value, field=attribute.name)
    except InvalidValue as exc:
        raise ValueError(str(exc).removeprefix(f"{attribute.name}: ")) from None


def _advertise(settings: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """A host (an IP address or a DNS name, no port); off loopback only with
    the cluster key, which is what keeps other hosts' callers out."""
    import ipaddress

    if value is None:
        return
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host) or host.endswith("."):
            raise ValueError(
                f"{value!r} is not a host: write the IP address or DNS name other hosts"
                " reach this host on, without a port (e.g. 10.0.0.5)"
            ) from None
    if ip is not None and ip.is_unspecified:
        raise ValueError(
            f"{value!r} is not an address other hosts can reach: write this host's own"
            " address on the network the other kernels share (e.g. 10.0.0.5)"
        )
    loopback = host.lower() == "localhost" or (ip is not None and ip.is_loopback)
    if not loopback and not settings.cluster_key:
        raise ValueError(
            f"{value} is off loopback: this kernel's instances would take calls from"
            " other hosts, and nothing would check who calls them. Set kernel.cluster_key"
            " (a secret of at least 16 characters, the same on every kernel, e.g."
            " ${file:cluster.key}): instances then take calls only from kernels and"
            " clients that hold it (docs/multihost.md)"
        )


def _cluster_key(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and len(value) < 16:
        raise ValueError(f"a cluster key has at least 16 characters, not {len(value)}")


def _share(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:  # NaN too
        raise ValueError(
            f"{value!r} is not a share of calls: write a number from 0.0 (trace none)"
            " to 1.0 (trace every call), e.g. 0.01 for one call in a hundred"
        )


@attrs.frozen
class KernelSettings:
    """The ``kernel`` section of a deployment."""

    #: the data plane: where clients call the units' interfaces (the gateway,
    #: with health and reflection): ``host:port`` (loopback by default) or
    #: ``unix:/path``
    address: str = attrs.field(default="127.0.0.1:7420", validator=_listen_address)
    #: the control plane: where the Kernel API and the kernel's Core listen;
    #: default a 0600 unix socket in the 0700 state dir (``control.sock``).
    #: A TCP address is opt-in; one off loopback needs ``insecure: true``
    control: str | None = attrs.field(default=None, validator=_listen_address)
    #: allow a control or data address off loopback with nothing
    #: authenticating callers (logged as a warning at every start)
    insecure: bool = False
    #: TLS (and mTLS) on the data plane and a TCP control plane: see ``TLSSettings``
    tls: TLSSettings | None = None
    #: seconds calls in flight get to finish when the kernel drains
    drain_grace: Seconds = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: ``text``, or ``json``: one JSON object a line (loguru's serializer) for
    #: the kernel and the HSUs it starts (``--log-format`` overrides it)
    log_format: LogFormat = LogFormat.TEXT
    #: how many of the kernel's own log records StreamLogs can replay
    log_tail: int = attrs.field(default=2000, validator=attrs.validators.ge(0))
    #: where the kernel keeps its state file and the instances' log files;
    #: relative to the deployment file; default ``.hsu/<deployment name>``
    state_dir: str | None = None
    #: instances outlive a kernel that dies, and the next kernel re-attaches to
    #: them; ``false``: they are SIGKILLed when the kernel dies
    reattach: bool = True
    #: per-instance stdout/stderr files rotate past this size, keeping backups
    log_max_bytes: int = attrs.field(default=10 * 2**20, validator=attrs.validators.ge(1024))
    log_backups: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    #: reload when a config source changes (deployment files: checked each second)
    watch_config: bool = False
    #: folders ``${file:PATH}`` references may read besides the deployment's
    #: own (relative to it); a path outside them is an error
    secret_roots: tuple[str, ...] = ()
    #: the service registry plugin (``hsu plugins``); ``memory`` keeps it in the kernel
    registry: str | None = None
    #: serve every unit's interfaces on the kernel's own address, forwarding each
    #: call to an instance (``docs/routing.md``)
    gateway: bool = True
    #: the storage plugin (``hsu plugins``): where the kernel keeps its instance
    #: records and what HSUs get over ``hsu.storage.v1.Storage``; ``sqlite``
    #: (the default) is one file in the state dir (docs/storage.md)
    storage: str | None = None
    #: the cache plugins' layers, first asked first (``[memory, redis]``):
    #: where the gateway keeps replies (``routing.cache``) and what HSUs get
    #: over ``hsu.cache.v1.Cache``; none: the default (``memory``), ``[]``: no
    #: cache (docs/cache.md)
    caches: tuple[str, ...] | None = None
    #: the host other hosts reach this kernel's instances on (docs/multihost.md):
    #: instances listen on ``ADVERTISE:0`` (unless a unit sets ``HSU_LISTEN``)
    #: and the registry lists that address; default: loopback only
    advertise: str | None = attrs.field(default=None, validator=_advertise)
    #: the secret every kernel of a cluster shares: instances take calls only
    #: with a proof made with it (:mod:`hsu.peer`); needed with an
    #: ``advertise`` off loopback
    cluster_key: str | None = attrs.field(default=None, validator=_cluster_key, repr=False)
    #: how an on-demand start picks the kernel to start on, with a registry
    #: shared by several (``hsu plugins``; built in: ``local-first``, the
    #: default, and ``least-loaded``; docs/multihost.md)
    placement: str | None = None
    #: count routed calls and their latency (``docs/observability.md``);
    #: values the kernel keeps anyway are read when an exporter collects
    metrics: bool = True
    #: metrics exporters to start, by the name their plugin registered
    #: (``hsu_register_exporters``; built in: ``prometheus``)
    exporters: tuple[str, ...] = ()
    #: the share of routed calls without trace context (no ``traceparent``)
    #: the kernel starts a trace for: 0.0 (none, the default) to 1.0 (every
    #: one); a call with a ``traceparent`` follows the caller's decision
    #: (docs/tracing.md)
    trace_sample: float = attrs.field(
        default=0.0,
        validator=_share,
        metadata={"json_schema": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0}},
    )


def check_units(
    deployment: Deployment,
    launchers: list[str],
    probes: Mapping[str, Any],
    balancers: Mapping[str, Any] | None = None,
    breakers: Mapping[str, Any] | None = None,
) -> None:
    """What one field cannot say alone: launchers, probes, balancers and
    breakers exist and accept the unit's options, min <= max, ``depends_on``
    names units and has no cycle, a command where one is needed.

    Raises :class:`ConfigError` listing every problem with its origin.
    """
    from hsu._kernel.supervision.resources import check_rlimits

    problems: list[str] = []
    units = deployment.units
    where = (deployment.source, deployment.origins)

    def problem(name: str, key: tuple[Any, ...], message: str) -> None:
        problems.append(
            describe(("units", name, *key), message, deployment.source, deployment.origins)
        )

    for name, spec in units.items():
        if spec.launcher is not None and spec.launcher not in launchers:
            problem(
                name,
                ("launcher",),
                f"no launcher named {spec.launcher!r} (registered: {', '.join(launchers)})",
            )
        if (
            spec.kind is UnitKind.UNMANAGED
            and not spec.pidfile
            and not spec.address
            and not spec.token
        ):
            problem(
                name,
                (),
                "an unmanaged unit needs 'pidfile', 'address' or a 'token' to register with",
            )
        if spec.min_instances > spec.max_instances:
            problem(
                name,
                ("min_instances",),
                f"{spec.min_instances} is more than max_instances ({spec.max_instances})",
            )
        if spec.placement is Placement.SINGLETON:
            for field, bad, why in (
                ("start", spec.start is StartMode.AT_START, "on-demand (where it leads)"),
                ("min_instances", spec.min_instances != 0, "0"),
                ("max_instances", spec.max_instances != 1, "1"),
                ("idle_timeout", spec.idle_after is not None, "unset (it never idles out)"),
                ("routing.autoscale.above", spec.routing.autoscale.above is not None, "unset"),
            ):
                if bad:
                    problem(
                        name,
                        tuple(field.split(".")),
                        f"a 'placement: singleton' unit needs {field} {why}",
                    )
        if spec.idle_timeout is not None and spec.idle_timeout < 0:
            problem(name, ("idle_timeout",), f"must be >= 0 (0: never), got {spec.idle_timeout!r}")
        for dep in spec.depends_on:
            if dep not in units:
                problem(name, ("depends_on",), f"no unit named {dep!r}{_suggest(dep, list(units))}")
        if spec.health is not None:
            probe = probes.get(spec.health.probe)
            if probe is None:
                problem(
                    name,
                    ("health", "probe"),
                    f"no probe named {spec.health.probe!r}"
                    f" (registered: {', '.join(sorted(probes)) or 'none'})",
                )
            else:
                options_path = ("units", name, "health", "options")
                try:
                    structure_options(probe, spec.health.options, options_path, *where)
                except ConfigError as exc:
                    problems.extend(exc.problems)
        r = spec.routing
        for what, table, chosen, options in (
            ("balancer", balancers, r.balancer, r.balancer_options),
            ("breaker", breakers, r.breaker, r.breaker_options),
        ):
            if table is None or chosen is None:  # None: not routed (no interfaces)
                continue
            factory = table.get(chosen)
            if factory is None:
                problem(
                    name,
                    ("routing", what),
                    f"no {what} named {chosen!r}{_suggest(chosen, list(table))}"
                    f" (registered: {', '.join(sorted(table)) or 'none'})",
                )
                continue
            options_path = ("units", name, "routing", f"{what}_options")
            try:
                structure_options(factory, options, options_path, *where)
            except ConfigError as exc:
                problems.extend(exc.problems)
        a = r.autoscale
        if a.above is not None and a.above <= a.below:
            problem(
                name,
                ("routing", "autoscale", "above"),
                f"must be more than below ({a.below}), got {a.above!r}",
            )
        for p in check_rlimits(spec.limits.rlimits):
            key, _, message = p.partition(": ")
            problem(name, ("limits", *key.split(".")), message or p)
    cycle = _find_cycle({n: s.depends_on for n, s in units.items()})
    if cycle:
        problem(cycle[0], ("depends_on",), "dependency cycle: " + " -> ".join(cycle))
    if problems:
        raise ConfigError(problems, deployment.source)


def _find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def start_order(units: Mapping[str, UnitSpec]) -> list[list[str]]:
    """Units in waves: each wave depends only on earlier ones (stop in reverse)."""
    left = {n: {d for d in s.depends_on if d in units} for n, s in units.items()}
    waves: list[list[str]] = []
    done: set[str] = set()
    while left:
        wave = sorted(n for n, deps in left.items() if deps <= done)
        if not wave:  # a cycle; check_units reports it
            wave = sorted(left)
        waves.append(wave)
        done.update(wave)
        for n in wave:
            del left[n]
    return waves
