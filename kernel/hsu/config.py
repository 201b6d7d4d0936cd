"""Configuration documents into layers: the toolbox of config-source plugins.

A config source (:class:`hsu.ports.ConfigSource`) returns :class:`hsu.ports.Layer`
objects: the data plus the origin of every path, so an error can say
``deploy.yaml:14``. :func:`read_file` reads a YAML, JSON or TOML file (YAML and
JSON keep line numbers; TOML, read with the standard library, gives the file
name only); :func:`env_layer` and :func:`overrides_layer` build the layers of
``HSU_A__B=...`` variables and ``--set a.b=...`` options.

Input is bounded: a file is at most :data:`MAX_FILE_BYTES`, valid UTF-8, with
no duplicate keys, nested at most :data:`MAX_DEPTH` levels, and YAML aliases
may repeat at most :data:`MAX_ALIASED_NODES` values (a "billion laughs" file
is refused as it is read, in milliseconds). Every such problem is a one-line
:class:`~hsu.errors.ConfigError` saying where.

Durations: :data:`Seconds`, the type of every setting that is a number of
seconds, which a deployment may also write as ``500ms``, ``5s``, ``2m``,
``1h`` or ``1m30s`` (:func:`parse_duration`); a plugin's settings class
annotates its own such fields with it.

Secrets: :class:`SecretStr` (what ``${env:..}``/``${file:..}`` resolve to),
:func:`redact`, and :func:`child_env`, the part of the kernel's environment an
HSU inherits (:data:`DEFAULT_PASS_ENV`); :func:`read_env_file`, a unit's
``env_file`` (dotenv).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Annotated, Any

import yaml

from hsu.errors import ConfigError
from hsu.ports import Layer, Origin, PathT

SUFFIXES = (".yaml", ".yml", ".json", ".toml")

#: the largest deployment file read (bytes)
MAX_FILE_BYTES = 1 << 20
#: mappings and lists nested deeper than this are refused
MAX_DEPTH = 100
#: values a document may repeat through YAML aliases (``*name``), counted
#: as they are expanded: a shared subtree of 50 values used 3 times is 150
MAX_ALIASED_NODES = 10_000
#: values in one document, aliases expanded
MAX_NODES = 1_000_000

#: the kernel environment variables an HSU inherits unless its unit says
#: otherwise (``pass_env``): what a program needs to find its tools, its home,
#: its locale and time zone, its Python packages and its CA certificates.
#: Anything else of the kernel's (credentials in particular) is not passed on.
DEFAULT_PASS_ENV: tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ",
    "TMPDIR", "TERM", "PYTHONPATH", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR",
)  # fmt: skip

_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE_LOADER):  # type: ignore[misc]
    """The safe loader (libyaml's when there is one), each plain value's tag
    resolved once per document: a deployment repeats its keys and values
    (``kind``, ``managed``, ``1``) once per unit, and the resolver tries its
    regular expressions in Python for every one."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.resolved: dict[tuple[str, Any], str] = {}
        if not self.yaml_path_resolvers:
            # called for every node, and they do nothing without path
            # resolvers: C callables that do nothing either, instead of
            # Python methods (``slice(a, b)`` and ``tuple()`` make an object)
            self.descend_resolver = slice
            self.ascend_resolver = tuple

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not yaml.ScalarNode or self.yaml_path_resolvers:
            return super().resolve(kind, value, implicit)
        key = (value, implicit)
        tag = self.resolved.get(key)
        if tag is None:
            tag = self.resolved[key] = super().resolve(kind, value, implicit)
        return tag


_LOADER: Any = _Loader
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"


class _Duration:
    """The marker of :data:`Seconds` (the converter and the JSON Schema look
    for it)."""

    def __repr__(self) -> str:
        return "hsu.config.DURATION"


DURATION = _Duration()
#: a number of seconds: a number (``2.5``) or a duration (``500ms``, ``5s``,
#: ``2m``, ``1h``, ``1m30s``); the field holds a float of seconds
Seconds = Annotated[float, DURATION]
#: one part of a duration: a number and its unit
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: what the JSON Schema accepts as a duration string
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h))+$"


def parse_duration(value: Any) -> float:
    """Seconds from a number or a duration string (``500ms``, ``5s``, ``2m``,
    ``1h``, ``1m30s``). Raises ``ValueError`` with one line saying what is
    accepted; ``true`` is not a number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        parts = list(_DURATION_PART.finditer(text))
        if parts and "".join(m[0] for m in parts) == text:
            return sum(float(m[1]) * _UNIT_SECONDS[m[2]] for m in parts)
    raise ValueError(f"expected seconds or a duration (500ms, 5s, 2m), got {value!r}")


class SecretStr(str):
    """A string resolved from a ``${env:..}`` or ``${file:..}`` reference.

    It is the plain string in every use (equality, ``str()``, the environment
    of a process), but its ``repr`` is ``'***'``: an error message that quotes
    a value (``got {value!r}``) does not show a secret.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` replaced by ``***``
    (the longest first, so a secret containing another is hidden whole).
    Empty strings are ignored; a deployment's ``secrets`` holds only values
    of at least 4 characters, as shorter ones would mangle any text."""
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not values:
        return text
    return re.sub("|".join(re.escape(v) for v in values), "***", text)


def child_env(pass_env: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` whose names match one of the ``pass_env``
    glob patterns (``fnmatch``, case-sensitive): what an HSU inherits of the
    kernel's environment, before its unit's own ``env`` and the kernel's
    ``HSU_*`` variables are added."""
    match = _env_matcher(tuple(pass_env))
    return {k: v for k, v in environ.items() if match(k)}


@functools.lru_cache(maxsize=64)
def _env_matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled regex for all of ``patterns`` (a spawn of each of 1,000
    instances matched every variable against every pattern with ``fnmatchcase``)."""
    if not patterns:
        return lambda name: False
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


# -- env files ------------------------------------------------------------------

#: a variable's name in an env file
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: what a backslash escape in a double-quoted env file value stands for
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


class EnvFileError(ValueError):
    """A unit's ``env_file`` cannot be read, or a line of it is not
    ``KEY=VALUE``; the message names the file and line, never a value."""


def parse_env_file(text: str, name: str) -> dict[str, str]:
    """The variables of a dotenv file's ``text`` (``name`` is what errors
    call the file).

    One ``KEY=VALUE`` a line, ``export `` before it allowed; blank lines and
    lines starting with ``#`` are skipped. A value is taken as written
    (spaces around it dropped, and a `` #`` comment after it), or quoted:
    ``'...'`` literally, ``"..."`` with ``\\n``, ``\\t``, ``\\r``, ``\\"``,
    ``\\\\`` and ``\\$`` escapes; no ``$VAR`` expansion. A later line wins
    over an earlier one with the same key. Raises :class:`EnvFileError`
    naming ``name:line``.
    """
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):

        def bad(why: str, number: int = number) -> EnvFileError:
            return EnvFileError(f"{name}:{number}: {why}")

        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[7:].lstrip()
        key, eq, rest = stripped.partition("=")
        key = key.rstrip()
        if not eq:
            raise bad("expected KEY=VALUE")
        if not ENV_NAME.fullmatch(key):
            raise bad(
                "the name before '=' must be letters, digits and '_', not starting with a digit"
            )
        rest = rest.strip()
        if rest[:1] in ("'", '"'):
            value, after = _quoted(rest, bad)
            if after.strip() and not after.strip().startswith("#"):
                raise bad(f"{key}: only a comment may follow the closing quote")
        else:
            value = re.split(r"\s#", rest, maxsplit=1)[0].rstrip()
        if "\0" in value:
            raise bad(f"{key}: a value cannot hold a NUL character")
        env[key] = value
    return env


def _quoted(rest: str, bad: Any) -> tuple[str, str]:
    """A quoted value at the start of ``rest``, and what follows its closing quote."""
    quote = rest[0]
    out: list[str] = []
    i = 1
    while i < len(rest):
        c = rest[i]
        if c == quote:
            return "".join(out), rest[i + 1 :]
        if c == "\\" and quote == '"' and i + 1 < len(rest):
            out.append(_ESCAPES.get(rest[i + 1], "\\" + rest[i + 1]))
            i += 2
            continue
        out.append(c)
        i += 1
    raise bad(f"a {quote} quote that is not closed on its line")


def read_env_file(path: str | Path, name: str | None = None) -> dict[str, str]:
    """The variables of the dotenv file at ``path`` (see
    :func:`parse_env_file`; ``name``: what errors call it, default the
    path). At most :data:`MAX_FILE_BYTES`, UTF-8. Raises
    :class:`EnvFileError` for a file that is missing, unreadable, too large
    or has a bad line."""
    name = str(path) if name is None else name
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise EnvFileError(f"{name}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise EnvFileError(f"{name}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EnvFileError(f"{name}:{line}: not valid UTF-8") from None
    return parse_env_file(text.removeprefix("\ufeff"), name)


# -- files --------------------------------------------------------------------


def read_file(path: Path) -> Layer:
    """One deployment file as a layer, or a :class:`ConfigError` saying what
    is wrong and where (one line): unreadable, too large, not UTF-8, not
    valid YAML/JSON/TOML, a duplicate key, nested or aliased beyond bounds,
    or not a mapping at the top. Pure: safe to call from any thread."""
    source = str(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(
            [f"{source}: unknown file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"],
            source,
        )
    text = _read_text(path, source)
    if path.suffix == ".toml":
        import tomllib  # here: a kernel that reads no TOML does not load it

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"], source) from None
        except RecursionError:
            raise ConfigError([f"{source}: nested too deeply"], source) from None
        _check_depth(data, source)
        return Layer(data, {(): Origin(source)} | _all_paths(data, Origin(source)))
    return _yaml_layer(text, source)


def read_document(text: str, source: str) -> Layer:
    """A YAML (or JSON) document that is not a file, as a layer: for config
    sources that read a store (hsu-plugin-etcd). ``source`` names it in every
    error and origin (``etcd /hsu/v1/config/prod@42``); the same bounds and
    errors as :func:`read_file`."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_FILE_BYTES} bytes"], source)
    return _yaml_layer(text, source)


def _yaml_layer(text: str, source: str) -> Layer:
    """A YAML (or JSON) document as a layer whose origins are worked out
    from ``text`` again when first asked for (:class:`DeferredOrigins`)."""
    try:
        data, _ = _load_yaml(text, source, origins=False)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError([f"{where}: not valid YAML: {problem}"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: expected a mapping at the top, got {type(data).__name__}"], source
        )
    return Layer(data, DeferredOrigins.of_text(text, source))


def _yaml_again(text: str, source: str) -> Layer:
    """The layer :func:`_yaml_layer` made of ``text``, with its origins: the
    text was read once without errors, so it reads the same again."""
    data, origins = _load_yaml(text, source)
    return Layer({} if data is None else data, {(): Origin(source, 1)} | origins)


class DeferredOrigins(MutableMapping[PathT, Origin]):
    """A layer's origins, worked out when first asked for: only an error
    message or ``hsu config show`` needs them, and a dict of every key's
    file and line held some 1.2 KiB per unit of a deployment. ``make``
    returns them; ``again``, if given, returns the whole layer once more
    (data and origins), which :func:`~hsu._kernel.config.sources.merge`
    needs to work out the merged origins without holding the data."""

    __slots__ = ("_made", "_make", "again")

    def __init__(
        self, make: Callable[[], Mapping[PathT, Origin]], again: Callable[[], Layer] | None = None
    ) -> None:
        self._make = make
        self._made: dict[PathT, Origin] | None = None
        self.again = again

    @classmethod
    def of_text(cls, text: str, source: str) -> DeferredOrigins:
        """The origins of a YAML document: the text is parsed again with
        positions (about 0.1 KiB a unit held, against the origins' 1.2)."""
        again = functools.partial(_yaml_again, text, source)
        return cls(lambda: again().origins, again)

    @property
    def made(self) -> dict[PathT, Origin]:
        if self._made is None:  # two threads at once may both make them: the same
            made = self._make()
            self._made = made if isinstance(made, dict) else dict(made)
        return self._made

    def __getitem__(self, path: PathT) -> Origin:
        return self.made[path]

    def get(self, path: PathT, default: Any = None) -> Any:
        return self.made.get(path, default)

    def __contains__(self, path: object) -> bool:
        return path in self.made

    def __setitem__(self, path: PathT, origin: Origin) -> None:
        self.made[path] = origin

    def __delitem__(self, path: PathT) -> None:
        del self.made[path]

    def __iter__(self) -> Iterator[PathT]:
        return iter(self.made)

    def __len__(self) -> int:
        return len(self.made)

    def __repr__(self) -> str:
        return f"DeferredOrigins({'made' if self._made is not None else 'not made yet'})"


def _read_text(path: Path, source: str) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"], source) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            [f"{source}: larger than {MAX_FILE_BYTES // 2**20} MiB; a deployment file is at most"
             f" {MAX_FILE_BYTES} bytes"],
            source,
        )  # fmt: skip
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{source}: not valid UTF-8 at byte {exc.start} (line {line})"], source
        ) from None


def _load_yaml(
    text: str, source: str, lines: bool = True, origins: bool = True
) -> tuple[Any, dict[PathT, Origin]]:
    """Compose once (aliases share nodes), then build plain data within
    bounds; with ``origins``, also the origin of every path (else ``{}``).

    Without origins, a document with no anchor is built from the parser's
    events instead (:func:`_from_events`): no node graph, which was most of
    the memory a read took; on anything unusual (an error, a merge key, a
    tag, a bound) it is built from the nodes, which says what is wrong."""
    if not origins and "&" not in text:
        try:
            return _from_events(text), {}
        except Exception:  # the node builder says what is wrong, or reads it
            pass
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except RecursionError:
        raise ConfigError([f"{source}: nested too deeply"], source) from None
    if node is None:
        return None, {}
    # no anchor, no alias: no node is reached twice, nothing to track
    builder = _Builder(source, lines, origins, anchors="&" in text)
    return builder.build(node, (), 0, node.start_mark.line + 1), builder.origins


class _NotPlain(Exception):
    """What :func:`_from_events` leaves to the node builder."""


def _from_events(text: str) -> Any:
    """The data of a YAML document with no anchor, from the parser's events
    (the document is valid: no other kind of event, each collection ended),
    or :class:`_NotPlain` for a merge key, a key that is not a plain value,
    a duplicate key, a collection's explicit tag, more than
    :data:`MAX_NODES` values or :data:`MAX_DEPTH` levels, more than one
    document. Within those, the same data as :class:`_Builder` makes."""
    loader = _LOADER(text)
    try:
        get = loader.get_event
        resolve = loader.resolve
        scalars = _Builder("", track=False, anchors=False)
        get()  # the stream's start
        if type(get()) is yaml.StreamEndEvent:
            return None
        # each open collection: [the container, key awaited (maps), the key]
        stack: list[list[Any]] = []
        top: list[Any] | None = None
        root: Any = None
        nodes = 0
        while True:
            event = get()
            kind = type(event)
            if kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                assert top is not None
                value = top[0]
                stack.pop()
                top = stack[-1] if stack else None
                if top is None:
                    root = value
                    break
                continue  # in its parent since it started
            elif kind is yaml.ScalarEvent:
                tag = event.tag
                if tag is None or tag == "!":
                    tag = resolve(yaml.ScalarNode, event.value, event.implicit)
                if tag == _STR:
                    value = event.value
                elif tag == _MERGE:
                    raise _NotPlain
                else:
                    value = scalars.scalar(
                        yaml.ScalarNode(
                            tag, event.value, event.start_mark, event.end_mark, event.style
                        )
                    )
                if top is not None and top[1]:  # a key
                    if value in top[0]:  # a duplicate, or unhashable (TypeError)
                        raise _NotPlain
                    top[1], top[2] = False, value
                    continue
                nodes += 1
                if top is None:
                    root = value
                    break
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                tag = event.tag
                if (
                    tag is not None
                    and tag != "!"
                    and tag != (_MAP if kind is yaml.MappingStartEvent else _SEQ)
                ) or (top is not None and top[1]):
                    raise _NotPlain  # a tag, or a key that is a collection
                nodes += 1
                if len(stack) >= MAX_DEPTH:
                    raise _NotPlain
                container: Any = {} if kind is yaml.MappingStartEvent else []
                if top is not None:
                    if type(top[0]) is dict:
                        top[0][top[2]] = container
                        top[1] = True
                    else:
                        top[0].append(container)
                top = [container, kind is yaml.MappingStartEvent, None]
                stack.append(top)
                continue
            else:  # an alias, or something this does not expect
                raise _NotPlain
            if nodes > MAX_NODES or top is None:
                raise _NotPlain
            if type(top[0]) is dict:
                top[0][top[2]] = value
                top[1] = True
            else:
                top[0].append(value)
        if nodes > MAX_NODES or type(get()) is not yaml.DocumentEndEvent:
            raise _NotPlain
        if type(get()) is not yaml.StreamEndEvent:
            raise _NotPlain  # another document
        return root
    finally:
        loader.dispose()


#: scalar tags whose values are immutable and may be shared (``1`` a thousand times)
_SHARED = frozenset(f"tag:yaml.org,2002:{t}" for t in ("int", "bool", "null", "float"))


class _Builder:
    """Plain data from a composed YAML node graph: each alias expanded into a
    copy, counted, so the data is a tree of bounded size (later merges and
    walks are linear in it), and duplicate keys are refused. ``track``: keep
    each path's origin (what :class:`DeferredOrigins` asks for); ``anchors``:
    the text may hold aliases (without, no node is reached twice)."""

    def __init__(
        self, source: str, lines: bool = True, track: bool = True, anchors: bool = True
    ) -> None:
        self.source = source
        self.lines = lines
        self.track = track
        self.anchors = anchors
        self.origins: dict[PathT, Origin] = {}
        self.nodes = 0
        self.aliased = 0
        self.seen: set[int] = set()
        self.open: set[int] = set()  # the nodes being built: an alias to one is a cycle
        self.scalars = yaml.SafeLoader("")
        self.shared: dict[tuple[str, str], Any] = {}

    def where(self, line: int) -> str:
        return f"{self.source}:{line}" if self.lines else self.source

    def fail(self, line: int, message: str) -> ConfigError:
        return ConfigError([f"{self.where(line)}: {message}"], self.source)

    def origin(self, line: int) -> Origin:
        return Origin(self.source, line if self.lines else None)

    def build(
        self, node: yaml.Node, path: PathT, depth: int, line: int, alias: int | None = None
    ) -> Any:
        """``path``: where the value is (kept only with ``track``); ``depth``:
        how deep; ``line``: where the value is used (its key or list), for
        messages; ``alias``: where the outermost alias being expanded is used."""
        self.nodes += 1
        if self.anchors:
            if id(node) in self.seen:
                self.aliased += 1
                alias = line if alias is None else alias
                if id(node) in self.open:
                    raise self.fail(line, "a YAML alias refers to a value that contains it")
            self.seen.add(id(node))
            if self.aliased > MAX_ALIASED_NODES:
                raise self.fail(
                    alias or line,
                    f"too many aliased nodes (YAML aliases repeat more than"
                    f" {MAX_ALIASED_NODES:,} values)",
                )
        if self.nodes > MAX_NODES:
            raise self.fail(line, f"too many nodes (more than {MAX_NODES:,} values)")
        if depth > MAX_DEPTH:
            raise self.fail(line, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
                return self.sequence(node, path, depth, alias)
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
                return self.mapping(node, path, depth, alias)
        finally:
            self.open.discard(id(node))
        raise self.fail(node.start_mark.line + 1, f"YAML tag {node.tag!r} is not supported")

    def scalar(self, node: yaml.ScalarNode) -> Any:
        """The value of a plain or quoted scalar: its tag's constructor called
        as the loader would, without its bookkeeping (which is for
        collections and keeps every node alive); a number, boolean or null
        made once per document."""
        tag = node.tag
        if tag == _STR:
            return node.value
        if tag in _SHARED:
            key = (tag, node.value)
            if key in self.shared:
                return self.shared[key]
        construct = self.scalars.yaml_constructors.get(tag)
        if construct is None:
            return self.scalars.construct_object(node, deep=True)
        value = construct(self.scalars, node)
        if tag in _SHARED:
            self.shared[key] = value
        return value

    def sequence(
        self, node: yaml.SequenceNode, path: PathT, depth: int, alias: int | None
    ) -> list[Any]:
        out = []
        for i, item in enumerate(node.value):
            line = item.start_mark.line + 1
            child = path
            if self.track:
                child = (*path, i)
                self.origins[child] = self.origin(line)
            # an alias item's node is the anchored one, elsewhere: say the list
            used = node.start_mark.line + 1 if id(item) in self.seen else line
            out.append(self.build(item, child, depth + 1, used, alias))
        return out

    def mapping(
        self, node: yaml.MappingNode, path: PathT, depth: int, alias: int | None
    ) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: set[Any] = set()  # keys from ``<<: *base``, which a key of its own overrides
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                self.merge(value_node, path, depth, line, out, merged, alias)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(line, "a key must be a plain value, not a mapping or a list")
            key = self.scalar(key_node)
            try:
                hash(key)
            except TypeError:
                raise self.fail(line, f"a key must be a plain value, got {key!r}") from None
            if key in out and key not in merged:
                first = self.first_line(node, key)
                raise self.fail(line, f"duplicate key {key!r} (first at line {first})")
            child = path
            if self.track:
                child = (*path, key)
                if key in merged:
                    self._forget(child)
                self.origins[child] = self.origin(line)
            merged.discard(key)
            if self.anchors or not isinstance(value_node, yaml.ScalarNode):
                out[key] = self.build(value_node, child, depth + 1, line, alias)
                continue
            # what build does for a scalar, inline: most values of a deployment are
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise self.fail(line, f"too many nodes (more than {MAX_NODES:,} values)")
            if depth + 1 > MAX_DEPTH:
                raise self.fail(line, f"nested more than {MAX_DEPTH} levels deep")
            out[key] = self.scalar(value_node)
        return out

    def first_line(self, node: yaml.MappingNode, key: Any) -> int:
        """The line of ``key``'s first appearance in ``node`` (a duplicate's message)."""
        for key_node, _ in node.value:
            if (
                key_node.tag != _MERGE
                and isinstance(key_node, yaml.ScalarNode)
                and self.scalar(key_node) == key
            ):
                return int(key_node.start_mark.line + 1)
        return 0  # not reached: the key was set by a node of this mapping

    def merge(
        self,
        value: yaml.Node,
        path: PathT,
        depth: int,
        line: int,
        out: dict[Any, Any],
        merged: set[Any],
        alias: int | None,
    ) -> None:
        """``<<: *base`` or ``<<: [*a, *b]``: keys not already set (the first
        base listed wins, as in YAML 1.1)."""
        bases = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for base in bases:
            if not isinstance(base, yaml.MappingNode):
                raise self.fail(line, "'<<' merges a mapping or a list of mappings")
            scratch = _Builder(self.source, self.lines, self.track, self.anchors)
            scratch.nodes, scratch.aliased = self.nodes, self.aliased
            scratch.seen, scratch.open, scratch.shared = self.seen, self.open, self.shared
            built = scratch.build(base, path, depth, line, alias)
            self.nodes, self.aliased = scratch.nodes, scratch.aliased
            for key, item in built.items():
                if key in out:
                    continue
                out[key] = item
                merged.add(key)
                if self.track:
                    for p, origin in scratch.origins.items():
                        if p[: len(path) + 1] == (*path, key):
                            self.origins[p] = origin

    def _forget(self, prefix: PathT) -> None:
        for p in [p for p in self.origins if p[: len(prefix)] == prefix]:
            del self.origins[p]


def _check_depth(data: Any, source: str) -> None:
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError([f"{source}: nested more than {MAX_DEPTH} levels deep"], source)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _all_paths(data: Any, origin: Origin, prefix: PathT = ()) -> dict[PathT, Origin]:
    out: dict[PathT, Origin] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out[(*prefix, k)] = origin
            out.update(_all_paths(v, origin, (*prefix, k)))
    return out


# -- the environment and --set --------------------------------------------------


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
        source = f"env {name}"
        _set(layer, tuple(keys), parse_scalar(env[name], source), Origin(source))
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
        source = f"--set {item}"
        try:
            _set(layer, keys, parse_scalar(raw, source), Origin(source))
        except ConfigError as exc:
            problems.extend(exc.problems)
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


def parse_scalar(raw: str, source: str = "<value>") -> Any:
    """``raw`` read as a YAML value (``4``, ``true``, ``[a, b]``), or as the
    string itself when it is not valid YAML; within the same bounds as a file
    (a :class:`ConfigError` naming ``source`` past them)."""
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_FILE_BYTES // 2**20} MiB"], source)
    try:
        value, _ = _load_yaml(raw, source, lines=False, origins=False)
    except yaml.YAMLError:
        return raw
    return raw if value is None and raw.strip() not in ("null", "~") else value
