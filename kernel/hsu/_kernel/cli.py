# PYTHON_ARGCOMPLETE_OK
"""The ``hsu`` command: run a kernel, inspect plugins, talk to a running kernel.

Imports are lazy: ``hsu ping`` and ``hsu status`` load the generated
messages, never the kernel's machinery (config, plugins, supervision), so a
call to a running kernel starts quickly (tests/test_cli_conventions.py checks
the import set). On a local unix socket without TLS or a token, one-reply
calls go through the CLI's own HTTP/2 client (:mod:`hsu._kernel.h2unary`)
and grpcio is not imported either. Exit codes are in docs/cli.md (:data:`EXIT`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hsu._kernel.table import Column, render
from hsu._version import __version__
from hsu.errors import HsuError

if TYPE_CHECKING:
    from pathlib import Path

    import grpc

LOG_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[where]}</cyan>{message}"
)

#: the exit codes every command uses (docs/cli.md)
EXIT = {
    "ok": 0,  # done; for `hsu status`: the kernel runs and every instance is ready
    "error": 1,  # bad input, a refusal, a failure the message names
    "usage": 2,  # the command line itself is wrong (argparse)
    "not_ready": 3,  # `hsu status`: the kernel or an instance is not ready (yet)
    "fatal": 4,  # `hsu status`: an instance is fatal (its crash-loop breaker is open)
    "unreachable": 5,  # no kernel answers at the address
    "interrupted": 130,  # Ctrl-C
    "broken_pipe": 141,  # the reader of stdout went away (`hsu status | head -1`)
}


class KernelUnreachable(HsuError):
    """No kernel answers at the address (exit code 5)."""


def _setup_logging(
    level: str,
    kernel_log: Path | None = None,
    *,
    max_bytes: int = 10 * 2**20,
    backups: int = 3,
    fmt: str = "text",
) -> None:
    """Log to stderr at ``level`` (whoever reads it, a terminal or a service
    manager, keeps or rotates it). With ``kernel_log`` (``hsu run``), also the
    kernel's own records, not its HSUs' lines (those have their own files), to
    that file: mode 0600 in a 0700 directory, rotated when it would pass
    ``max_bytes``, the ``backups`` newest rotated files kept
    (``kernel.<date>.log``). ``fmt`` ``json``: one JSON object a line, in
    both (:mod:`hsu._kernel.logsetup`)."""
    from loguru import logger

    from hsu._kernel import logsetup

    logger.remove()
    logger.configure(patcher=logsetup.fields)
    logger.add(
        sys.stderr,
        level=level.upper(),
        **{"colorize": None, **logsetup.sink_options(fmt, LOG_FORMAT)},
    )
    if kernel_log is not None:
        from hsu._kernel.control import secure_dir

        secure_dir(kernel_log.parent)
        logger.add(
            str(kernel_log),
            level=level.upper(),
            **{
                "colorize": False,
                **logsetup.sink_options(
                    fmt, "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[where]}{message}"
                ),
            },
            filter=lambda record: "stream" not in record["extra"],
            rotation=max_bytes,
            retention=backups,
            opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW, 0o600),
        )


def _kernel_address(args: argparse.Namespace) -> str:
    """The control address to call: --control, --kernel NAME, --deployment
    FILE, $HSU_CONTROL, $HSU_KERNEL_ADDRESS, else the one running kernel."""
    if args.control:  # as control.resolve, without importing it
        return str(args.control)
    from hsu._kernel import control

    try:
        return control.resolve(args.control, kernel=args.kernel, deployment=args.deployment)
    except HsuError as exc:
        if str(exc).startswith("no running kernel"):
            raise KernelUnreachable(str(exc)) from None
        raise


def _print_json(data: Any, *, lines: bool = False) -> None:
    import json

    print(json.dumps(data) if lines else json.dumps(data, indent=2), flush=lines)


def _to_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _stamp(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds))


# -- commands ----------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from hsu._kernel import init

    if init.is_init():  # a container's PID 1: stay as its reaper, the kernel a child
        return init.run(init.kernel_argv())
    from hsu._kernel.config import loader as config_loader
    from hsu._kernel.kernel import Kernel

    ctx = config_loader.context([args.deployment], args.set)
    deployment, plugins = config_loader.load(ctx, args.plugin)
    kernel = Kernel(
        deployment, plugins, address=args.address, control_address=args.control, source_context=ctx
    )
    ks = kernel.kernel_settings
    kernel.log_format = args.log_format or ks.log_format.value
    _setup_logging(
        args.log_level,
        kernel.state_dir / "kernel.log",
        max_bytes=ks.log_max_bytes,
        backups=ks.log_backups,
        fmt=kernel.log_format,
    )
    import asyncio

    asyncio.run(kernel.serve())
    return 0


def _local_plugins(args: argparse.Namespace) -> list[dict[str, Any]]:
    from hsu._kernel.config.model import load_deployment
    from hsu._kernel.plugins import PluginManager

    explicit = list(args.plugin)
    if args.deployment:
        explicit = [*load_deployment(args.deployment).plugins, *explicit]
    return [i.to_dict() for i in PluginManager.load(explicit).infos()]


def _kernel_plugins(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The plugins the running kernel loaded (None when no kernel answers and
    none was named: ``hsu plugins`` then lists what this environment would load)."""
    from hsu._kernel import control

    named = args.control or args.kernel or os.environ.get("HSU_CONTROL")
    if args.local or args.plugin:
        return None
    if args.deployment:
        try:
            address = control.control_of(args.deployment)
        except HsuError:
            return None
    else:
        try:
            address = _kernel_address(args)
        except HsuError:
            if named:
                raise
            return None  # none running, or several and none named
    from hsu.kernel.v1 import kernel_pb2

    try:
        (reply,) = _unary(
            address,
            args,
            args.timeout,
            [
                (
                    KERNEL + "ListPlugins",
                    kernel_pb2.ListPluginsRequest(),
                    kernel_pb2.ListPluginsResponse,
                )
            ],
        )
    except KernelUnreachable:
        if named:
            raise
        return None
    out = []
    for p in reply.plugins:
        item = _to_dict(p)
        item.setdefault("hooks", [])
        item["provides"] = {kind: list(v.names) for kind, v in sorted(p.provides.items())}
        out.append(item)
    return out


PLUGIN_COLUMNS = [
    Column("NAME", lambda p: p["name"]),
    Column("STATUS", lambda p: p.get("status")),
    Column("SOURCE", lambda p: p.get("source")),
    Column("DISTRIBUTION", lambda p: f"{p.get('distribution', '')} {p.get('version', '')}".strip()),
]


def cmd_plugins(args: argparse.Namespace) -> int:
    infos = _kernel_plugins(args)
    if infos is None:
        infos = _local_plugins(args)
    if args.json:
        _print_json(infos)
        return 0
    table = render(infos, PLUGIN_COLUMNS, header=False)
    for line, i in zip(table, infos, strict=True):
        print(line)
        for kind, names in sorted(i.get("provides", {}).items()):
            print(f"    {kind}: {', '.join(names)}")
        if i.get("hooks"):
            print(f"    hooks: {', '.join(i['hooks'])}")
        if i.get("error"):
            print(f"    error: {i['error']}")
    return 0


def _client_tls(args: argparse.Namespace) -> Any:
    """``--ca``/``--cert``/``--key`` (or ``HSU_TLS_*``) as a ``TLSConfig``; None without them."""
    given = {f: getattr(args, f, None) for f in ("ca", "cert", "key")}
    if not any(given.values()):
        return None
    from hsu.tls import ENV, TLSConfig

    given["server_name"] = os.environ.get(ENV["server_name"]) or None
    return TLSConfig(**given)


def _channel(address: str, args: argparse.Namespace) -> Any:
    """A blocking channel to the kernel, with the bearer token when one is given."""
    import grpc

    from hsu.client.credentials import BearerInterceptor, bearer

    tls = _client_tls(args)
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        from hsu.tls import channel as tls_channel

        channel = tls_channel(address, tls)
    token = bearer(None, getattr(args, "token_file", None))
    return grpc.intercept_channel(channel, BearerInterceptor(token)) if token else channel


def _rpc_error(address: str, code: str, details: str | None) -> HsuError:
    """The CLI's error for a failed call: ``code`` the gRPC status's name."""
    if code == "UNAVAILABLE":
        return KernelUnreachable(f"no kernel answers at {address}: is `hsu run` running?")
    return HsuError(f"kernel at {address}: {code}: {details}")


def _call(address: str, fn: Any, timeout: float, args: argparse.Namespace) -> Any:
    import grpc

    try:
        with _channel(address, args) as channel:
            return fn(channel, timeout)
    except grpc.RpcError as exc:
        raise _rpc_error(address, exc.code().name, exc.details()) from None


KERNEL = "/hsu.kernel.v1.Kernel/"
CORE = "/hsu.core.v1.Core/"


def _local_socket(address: str, args: argparse.Namespace) -> str | None:
    """The unix socket path (a leading NUL: an abstract one) of a control
    address the CLI calls without grpcio; None for TCP, TLS or a token."""
    if _client_tls(args) is not None:
        return None
    if getattr(args, "token_file", None) or os.environ.get("HSU_TOKEN_FILE"):
        return None  # hsu.client.credentials reads it, and imports grpc
    if address.startswith("unix-abstract:"):
        return "\0" + address[len("unix-abstract:") :]
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:") :]
    if path.startswith("//"):  # unix:///absolute/path
        path = path[2:]
        return path if path.startswith("/") else None
    return path


def _unary(
    address: str, args: argparse.Namespace, timeout: float, calls: Sequence[tuple[str, Any, Any]]
) -> list[Any]:
    """The replies of unary calls to the kernel, each ``(/pkg.Service/Method,
    request, reply class)``, in order: through :mod:`hsu._kernel.h2unary` on a
    local unix socket (no grpcio import, docs/benchmarks.md), else through grpcio."""
    read = _send(address, args, timeout, [(method, request) for method, request, _ in calls])
    return read([reply for _, _, reply in calls])


def _send(
    address: str, args: argparse.Namespace, timeout: float, calls: Sequence[tuple[str, Any]]
) -> Callable[[Sequence[Any]], list[Any]]:
    """:func:`_unary` in two halves: on a local unix socket the requests go
    out now, and the function returned takes the reply classes and reads the
    replies (``hsu status`` imports its messages in between, while the kernel
    answers); through grpcio everything happens in the second half."""
    path = _local_socket(address, args)
    if path is None:

        def through_grpc(replies: Sequence[Any]) -> list[Any]:
            def go(channel: grpc.Channel, timeout: float) -> list[Any]:
                return [
                    channel.unary_unary(
                        method,
                        request_serializer=type(request).SerializeToString,
                        response_deserializer=reply.FromString,
                    )(request, timeout=timeout)
                    for (method, request), reply in zip(calls, replies, strict=True)
                ]

            return list(_call(address, go, timeout, args))

        return through_grpc

    from hsu._kernel import h2unary

    try:
        pending = h2unary.send(path, [(m, r.SerializeToString()) for m, r in calls], timeout)
    except h2unary.RpcError as exc:
        raise _rpc_error(address, exc.code, exc.details) from None

    def read(replies: Sequence[Any]) -> list[Any]:
        try:
            raw = pending()
        except h2unary.RpcError as exc:
            raise _rpc_error(address, exc.code, exc.details) from None
        return [reply.FromString(data) for reply, data in zip(replies, raw, strict=True)]

    return read


#: ``hsu status``'s instance table, and the one that start/stop/scale print
#: (a column is a title and a function of a ``kernel_pb2.Instance``)
INSTANCE_COLUMNS = [
    Column("INSTANCE", lambda i: i.instance_id),
    Column("STATE", lambda i: i.state),
    Column("PID", lambda i: i.pid or None, ">"),
    Column("ADDRESS", lambda i: i.address),
    Column("RESTARTS", lambda i: i.restarts, ">"),
    Column("INTERFACES", lambda i: ", ".join(i.interfaces)),
    Column(
        "LAST EXIT",
        lambda i: (
            i.last_exit.splitlines()[0]
            if i.state in ("backoff", "fatal", "stopped") and i.last_exit
            else None
        ),
    ),
]

#: instance states that count as not ready for ``hsu status``'s exit code
#: (``fatal`` has its own code)
NOT_READY = ("starting", "stopping", "backoff", "stopped")


def _print_instances(instances: Sequence[Any], args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        _print_json({"instances": [_to_dict(i) for i in instances]})
        return
    if not instances:
        print("no instances")
        return
    for line in render(instances, INSTANCE_COLUMNS):
        print(line)


def status_code(kernel_state: str, instances: Sequence[Any]) -> int:
    """``hsu status``'s exit code: fatal wins over not ready, which wins over ready."""
    states = {i.state for i in instances}
    if "fatal" in states:
        return EXIT["fatal"]
    if kernel_state != "running" or states & set(NOT_READY):
        return EXIT["not_ready"]
    return EXIT["ok"]


def cmd_status(args: argparse.Namespace) -> int:
    from hsu._kernel import cli_live as live

    address = _kernel_address(args)
    # the requests go out before the messages are imported (a good part of
    # the CLI's start), so the kernel works on them meanwhile
    shown = live.USAGE.values() if args.json else [live.USAGE[c] for c in live.SHOWN]
    read = _send(address, args, args.timeout, _live_requests(shown))
    metrics, status, listing = read(_live_replies())
    code = status_code(status.state, listing.instances)
    used = live.usage(metrics.families)
    if args.json:
        _print_json(
            {
                "status": _to_dict(status),
                "instances": [_to_dict(i) for i in listing.instances],
                "usage": used,
                "exit_code": code,
            }
        )
        return code
    print(
        f"kernel {status.deployment}: {status.state} at {status.address}"
        f" (pid {status.pid}, hsu {status.version})"
    )
    if not listing.instances:
        print("no instances")
    else:
        print("\n".join(live.instance_rows(listing.instances, used)))
    return code


def _is_instance_id(name: str) -> bool:
    # an instance id is "<unit>-<8 hex digits>"
    head, _, tail = name.rpartition("-")
    return bool(head) and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail)


def _live_requests(families: Iterable[str]) -> list[tuple[str, _Wire]]:
    """Core.Metrics of these ``families`` only, the kernel's own series (it
    then samples nothing else and asks no HSU: ``hsu top`` shows the
    gateway's calls), Kernel.Status and Kernel.ListInstances, as their bytes,
    made without protobuf; the replies are read as :func:`_live_replies`.
    Metrics goes first: the kernel starts sampling the instances' usage on a
    thread, then answers the other two meanwhile (docs/benchmarks.md)."""
    return [
        (CORE + "Metrics", metrics_request(families)),
        (KERNEL + "Status", _Wire()),
        (KERNEL + "ListInstances", _Wire()),
    ]


def _live_replies() -> list[Any]:
    """The reply classes of :func:`_live_requests`' calls, in order."""
    from hsu.core.v1 import core_pb2 as core
    from hsu.kernel.v1 import kernel_pb2 as k

    return [core.MetricsResponse, k.StatusResponse, k.ListInstancesResponse]


def metrics_request(families: Iterable[str]) -> _Wire:
    """``core_pb2.MetricsRequest(families=families, local=True)`` as its bytes:
    each name field 1, length-delimited; then field 2, varint 1."""
    out = bytearray()
    for name in families:
        data = name.encode()
        n = len(data)
        out.append(0x0A)
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
        out += data
    return _Wire(bytes(out) + b"\x10\x01")


def cmd_top(args: argparse.Namespace) -> int:
    from hsu._kernel import cli_live as live

    address = _kernel_address(args)
    requests = _live_requests([*live.USAGE.values(), *live.CALLS])

    def fetch() -> tuple[Any, Any, Any]:
        metrics, status, listing = _send(address, args, args.timeout, requests)(_live_replies())
        return status, listing, list(metrics.families)

    live.run_top(fetch, args.interval, args.iterations)
    return 0


def _target(args: argparse.Namespace) -> Any:
    from hsu.kernel.v1 import kernel_pb2

    if args.name in ("", None):
        raise HsuError("give a unit name or an instance id")
    is_instance = _is_instance_id(args.name)
    return kernel_pb2.TargetRequest(
        unit="" if is_instance else args.name,
        instance_id=args.name if is_instance else "",
        grace=getattr(args, "grace", 0.0) or 0.0,
    )


def _show_progress(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty() and not getattr(args, "json", False)


def _event_line(ev: Any) -> str:
    who = ev.instance_id or ev.unit or ev.kind
    move = f"{ev.from_state} -> {ev.to_state}" if ev.to_state else ev.kind
    topic = f" {ev.topic}" if ev.topic else ""
    data = "".join(f" {k}={v!r}" for k, v in sorted(ev.data.items()))
    reason = f"  ({ev.reason})" if ev.reason else ""
    return f"{_stamp(ev.at.seconds)} #{ev.seq}{topic} {who}: {move}{data}{reason}"


@contextlib.contextmanager
def _progress(channel: Any, unit: str, enabled: bool) -> Iterator[None]:
    """While the body waits on the kernel, print the unit's events to stderr.

    The watch replays the recent events and prints those from now on, so an
    event the kernel publishes before the watch is set up is not missed.
    """
    if not enabled:
        yield
        return
    import grpc

    from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    since = time.time() - 0.5
    stream = kernel_pb2_grpc.KernelStub(channel).WatchEvents(
        kernel_pb2.WatchEventsRequest(unit=unit, replay=True)
    )

    def pump() -> None:
        try:
            for ev in stream:
                if ev.lost or ev.at.seconds + ev.at.nanos / 1e9 < since:
                    continue
                print(_event_line(ev), file=sys.stderr, flush=True)
        except grpc.RpcError:
            pass  # cancelled below, or the kernel went away (the call says why)

    import threading

    thread = threading.Thread(target=pump, name="hsu-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        # the last events (the instance's "ready") may trail the reply a little
        time.sleep(0.2)
        stream.cancel()
        thread.join(5)


def _action(method: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        from hsu.kernel.v1 import kernel_pb2

        request = _target(args)
        unit = request.unit or request.instance_id.rpartition("-")[0]
        reply = _acting(args, unit, KERNEL + method, request, kernel_pb2.TargetResponse)
        _print_instances(reply.instances, args)
        return 0

    return cmd


def _acting(args: argparse.Namespace, unit: str, method: str, request: Any, reply: Any) -> Any:
    """A start/stop/restart/scale call, with the unit's events on stderr while
    it waits (:func:`_progress`, a stream: grpcio); one unary call without."""
    address = _kernel_address(args)
    if not _show_progress(args):
        return _unary(address, args, args.timeout, [(method, request, reply)])[0]

    def go(channel: grpc.Channel, timeout: float) -> Any:
        call = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply.FromString,
        )
        with _progress(channel, unit, True):
            return call(request, timeout=timeout)

    return _call(address, go, args.timeout, args)


def cmd_scale(args: argparse.Namespace) -> int:
    from hsu.kernel.v1 import kernel_pb2

    request = kernel_pb2.ScaleRequest(unit=args.unit, count=args.count)
    reply = _acting(args, args.unit, KERNEL + "Scale", request, kernel_pb2.TargetResponse)
    _print_instances(reply.instances, args)
    return 0


ENDPOINT_COLUMNS = [
    Column("INSTANCE", lambda e: e.instance_id),
    Column("STATE", lambda e: e.state),
    Column("ADDRESS", lambda e: e.address),
    Column("WEIGHT", lambda e: e.weight, ">"),
]


def cmd_endpoints(args: argparse.Namespace) -> int:
    from hsu.kernel.v1 import kernel_pb2

    request = kernel_pb2.ResolveRequest(interface=args.interface, ensure=args.ensure)
    (reply,) = _unary(
        _kernel_address(args),
        args,
        args.timeout,
        [(KERNEL + "Resolve", request, kernel_pb2.ResolveResponse)],
    )
    p = reply.policy
    if args.json:
        _print_json(_to_dict(reply))
        return 0
    print(
        f"{args.interface}: unit {p.unit}, balancer {p.balancer}, breaker {p.breaker},"
        f" idempotent: {', '.join(p.idempotent) or 'none'}"
    )
    if not reply.endpoints:
        print("  no instance (a call starts one; --ensure starts one now)")
    for line in render(reply.endpoints, ENDPOINT_COLUMNS, indent="  "):
        print(line)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from hsu.kernel.v1 import kernel_pb2

    (reply,) = _unary(
        _kernel_address(args),
        args,
        args.timeout,
        [(KERNEL + "Reload", kernel_pb2.ReloadRequest(), kernel_pb2.ReloadResponse)],
    )
    if args.json:
        _print_json(_to_dict(reply))
    else:
        print(f"reloaded: {reply.summary}")
    return 0


def _log_unit(rec: Any) -> str:
    extra = rec.extra
    if extra.get("unit"):
        return str(extra["unit"])
    instance = extra.get("instance", "")
    return instance.rpartition("-")[0] if _is_instance_id(instance) else "kernel"


#: ``hsu logs``'s columns; UNIT only when the lines of every unit are shown
LOG_COLUMNS = [
    Column("TIME", lambda r: _stamp(r.time.seconds)),
    Column("UNIT", _log_unit),
    Column("WHERE", lambda r: f"[{' '.join(filter(None, [r.extra.get('instance'), r.stream]))}]"),
    Column("MESSAGE", lambda r: r.message),
]


def _log_json(rec: Any) -> dict[str, Any]:
    return {
        "time": rec.time.ToJsonString(),
        "unit": _log_unit(rec),
        "instance": rec.extra.get("instance", ""),
        "stream": rec.stream,
        "level": rec.level,
        "message": rec.message,
    }


def _check_log_target(channel: Any, name: str, timeout: float) -> tuple[str, str, list[str]]:
    """(unit, instance_id, every unit's name) for ``hsu logs NAME``; an error
    naming the known units when NAME is none of them."""
    from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    stub = kernel_pb2_grpc.KernelStub(channel)
    units = list(stub.Status(kernel_pb2.StatusRequest(), timeout=timeout).units)
    if not name or name in units:
        return name, "", units
    head = name.rpartition("-")[0]
    if _is_instance_id(name) and head in units:
        return "", name, units  # a gone instance's past lines are still there
    known = ", ".join(units) or "none"
    raise HsuError(f"no unit or instance named {name!r} (units: {known})")


def cmd_logs(args: argparse.Namespace) -> int:
    import grpc

    from hsu.core.v1 import core_pb2, core_pb2_grpc

    address = _kernel_address(args)
    columns = LOG_COLUMNS if not args.name else [c for c in LOG_COLUMNS if c.title != "UNIT"]
    try:
        with _channel(address, args) as channel:
            unit, instance, units = _check_log_target(channel, args.name, args.timeout)
            request = core_pb2.StreamLogsRequest(
                tail=args.tail, follow=args.follow, unit=unit, instance_id=instance
            )
            stream = core_pb2_grpc.CoreStub(channel).StreamLogs(
                request, timeout=None if args.follow else args.timeout
            )
            if args.json:
                for rec in stream:
                    _print_json(_log_json(rec), lines=True)
            elif not args.follow:
                for line in render(list(stream), columns, header=False):
                    print(line)
            else:
                width = max(len(u) for u in [*units, "kernel"])
                for rec in stream:
                    unit_cell = f"{_log_unit(rec):<{width}}  " if not args.name else ""
                    where = columns[-2].cell(rec)
                    print(
                        f"{_stamp(rec.time.seconds)}  {unit_cell}{where}  {rec.message}", flush=True
                    )
    except grpc.RpcError as exc:
        raise _rpc_error(address, exc.code().name, exc.details()) from None
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

    address = _kernel_address(args)
    request = kernel_pb2.WatchEventsRequest(
        unit=args.unit or "", replay=args.replay, topics=args.topic or ()
    )

    def follow(channel: grpc.Channel, timeout: float) -> None:
        for ev in kernel_pb2_grpc.KernelStub(channel).WatchEvents(request):
            if args.json:
                _print_json(_to_dict(ev), lines=True)
            elif ev.lost:
                print(f"... {ev.lost} events lost (this reader fell behind)", flush=True)
            else:
                print(_event_line(ev), flush=True)

    _call(address, follow, 0.0, args)
    return 0


class _Wire(bytes):
    """A message as its bytes on the wire, for :func:`_unary`: ``hsu ping``
    needs nothing of the reply, and so imports no protobuf."""

    def SerializeToString(self) -> bytes:
        return bytes(self)

    @classmethod
    def FromString(cls, data: bytes) -> _Wire:
        return cls(data)


#: ``core_pb2.PingRequest(payload=b"hsu")``: field 1, length-delimited, 3 bytes
PING_REQUEST = _Wire(b"\x0a\x03hsu")


def cmd_ping(args: argparse.Namespace) -> int:
    address = _kernel_address(args)
    call = (CORE + "Ping", PING_REQUEST, _Wire)
    t0 = time.perf_counter()
    _unary(address, args, args.timeout, [call])
    elapsed = time.perf_counter() - t0
    if args.json:
        _print_json({"address": address, "ms": round(elapsed * 1000, 3)})
    else:
        print(f"pong from {address} in {elapsed * 1000:.2f} ms")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    """Check a deployment without starting anything."""
    from hsu._kernel.config import loader as config_loader

    ctx = config_loader.context([args.deployment], args.set)
    deployment, _ = config_loader.validate(ctx, args.plugin)
    if args.json:
        _print_json({"deployment": args.deployment, "ok": True, "units": sorted(deployment.units)})
    else:
        print(f"{args.deployment}: ok ({len(deployment.units)} units)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from hsu._kernel.config import loader as config_loader

    ctx = config_loader.context([args.deployment] if args.deployment else [], args.set)
    deployment, settings = config_loader.validate(ctx, args.plugin)
    rows = config_loader.show(deployment, settings)
    if args.json:
        _print_json(rows)
    else:
        print(config_loader.format_rows(rows))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from hsu._kernel.config import loader as config_loader
    from hsu._kernel.config.schema import deployment_schema, plugin_choices
    from hsu._kernel.plugins import PluginManager

    explicit = list(args.plugin)
    if args.deployment:
        deployment, _ = config_loader.load(config_loader.context([args.deployment]), explicit)
        explicit = [*deployment.plugins, *explicit]
    plugins = PluginManager.load(explicit)
    schema = deployment_schema(plugins.settings_classes(), **plugin_choices(plugins))
    _print_json(schema)
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from hsu._kernel import cli_new  # the templates' machinery, for `hsu new` only

    return cli_new.cmd_new(args)


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        from argcomplete.shell_integration import shellcode
    except ImportError:
        raise HsuError(
            "shell completion needs argcomplete: pip install 'hsu[completion]'"
        ) from None
    print(shellcode(["hsu"], shell=args.shell))
    return 0


def complete_targets(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Unit names and instance ids of the running kernel (for argcomplete);
    nothing when no kernel answers within a second."""
    from hsu.kernel.v1 import kernel_pb2 as k

    units_only = getattr(parsed_args, "command", "") in ("scale", "events")
    try:
        replies = _unary(
            _kernel_address(parsed_args),
            parsed_args,
            1.0,
            [
                (KERNEL + "Status", k.StatusRequest(), k.StatusResponse),
                (KERNEL + "ListInstances", k.ListInstancesRequest(), k.ListInstancesResponse),
            ][: 1 if units_only else 2],
        )
        names = [*replies[0].units, *(i.instance_id for r in replies[1:] for i in r.instances)]
    except Exception:  # completion never fails the shell
        return []
    return [n for n in names if n.startswith(prefix)]


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


# -- parser -----------------------------------------------------------------


def _columns() -> int:
    """The terminal's width, as :func:`shutil.get_terminal_size` says it."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help, as wide as argparse makes it, without its ``import
    shutil`` (with bz2, lzma, fnmatch) in every parser: a few ms of ``hsu ping``."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Unbuilt:
    """Stands in for the parser of a command that is not being run
    (:func:`build_parser`'s ``only``): whatever is asked of it is not made."""

    def __getattr__(self, name: str) -> Callable[..., _Unbuilt]:
        return lambda *args, **kwargs: self


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``hsu`` command line. ``only``: the command being run: every
    command is listed, but only its arguments are made (argparse's
    ``add_argument`` costs a few ms over all commands, a good part of what
    ``hsu ping`` may take)."""
    parser = argparse.ArgumentParser(
        prog="hsu",
        formatter_class=_Formatter,
        description="Run a kernel, inspect plugins, talk to a running kernel.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 not ready, 4 fatal, 5 kernel"
        " unreachable, 141 stdout closed (docs/cli.md).",
    )
    parser.add_argument("--version", action="version", version=f"hsu {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("HSU_LOG_LEVEL", "INFO"),
        help="TRACE, DEBUG, INFO, WARNING or ERROR (env HSU_LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("HSU_LOG_FORMAT") or None,
        help="text, or json: one JSON object a line with unit, instance, pid and, inside a"
        " call, trace_id and span_id (env HSU_LOG_FORMAT; default: the deployment's"
        " kernel.log_format, else text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> Any:
        p = sub.add_parser(name, formatter_class=_Formatter, **kwargs)
        return p if only in (None, name) else _Unbuilt()

    def plugin_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-p",
            dest="plugin",
            action="append",
            default=[],
            metavar="NAME",
            help="load plugin NAME (entry point or module); no:NAME blocks it. Repeatable.",
        )

    def address_opt(p: argparse.ArgumentParser, what: str) -> None:
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--control",
            "--address",
            dest="control",
            metavar="ADDRESS",
            help=f"{what}: its control address (unix:/path or host:port); default"
            " $HSU_CONTROL, $HSU_KERNEL_ADDRESS, else the one running kernel",
        )
        where.add_argument(
            "-k", "--kernel", metavar="NAME", help=f"{what}: the running kernel of deployment NAME"
        )
        where.add_argument(
            "-d",
            "--deployment",
            metavar="FILE",
            help=f"{what}: the kernel of this deployment file",
        )
        env = os.environ
        p.add_argument(
            "--token-file",
            default=env.get("HSU_TOKEN_FILE") or None,
            metavar="FILE",
            help="auth: send the bearer token on FILE's first line (env HSU_TOKEN_FILE;"
            " docs/auth.md)",
        )
        p.add_argument(
            "--ca",
            default=env.get("HSU_TLS_CA") or None,
            metavar="PEM",
            help="TLS: the CA bundle a kernel serving TLS on a TCP control address is checked"
            " against (env HSU_TLS_CA; a unix: address is plaintext)",
        )
        p.add_argument(
            "--cert",
            default=env.get("HSU_TLS_CERT") or None,
            metavar="PEM",
            help="mTLS: this client's certificate chain (env HSU_TLS_CERT)",
        )
        p.add_argument(
            "--key",
            default=env.get("HSU_TLS_KEY") or None,
            metavar="PEM",
            help="mTLS: the key of --cert (env HSU_TLS_KEY)",
        )

    def json_opt(p: argparse.ArgumentParser, what: str = "print JSON") -> None:
        p.add_argument("--json", action="store_true", help=what)

    def progress_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="print the unit's events to stderr while waiting (default: when stderr is"
            " a terminal)",
        )

    def target(p: argparse.ArgumentParser, *args: str, **kwargs: Any) -> None:
        action = p.add_argument(*args, **kwargs)
        action.completer = complete_targets  # type: ignore[attr-defined]

    def set_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help="override one value, e.g. units.echo.stop_grace=3 (wins over file and env)",
        )

    p = command("run", help="start a kernel for a deployment and serve until stopped")
    p.add_argument("deployment", help="deployment file (YAML, JSON or TOML)")
    plugin_opt(p)
    set_opt(p)
    p.add_argument(
        "--address", help="serve the data plane here instead of the deployment's kernel.address"
    )
    p.add_argument(
        "--control",
        help="serve the control plane here instead of kernel.control (default: a unix"
        " socket in the state dir)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="as hsu --log-format, for the kernel and its HSUs (overrides kernel.log_format)",
    )
    p.set_defaults(func=cmd_run)

    p = command(
        "plugins",
        help="list plugins: name, distribution, hooks, status (the running kernel's, when one"
        " answers)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--local",
        action="store_true",
        help="list what this environment would load, not what the running kernel loaded",
    )
    plugin_opt(p)
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_plugins)

    p = command("status", help="a running kernel's state and instances")
    address_opt(p, "the kernel to ask")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_status)

    p = command("top", help="a running kernel's units and instances, refreshed")
    address_opt(p, "the kernel to ask")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("-n", "--iterations", type=int, default=None, help="refresh N times, then exit")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_top)

    p = command("ping", help="round trip to a running kernel's Core.Ping")
    address_opt(p, "the kernel to ping")
    json_opt(p)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_ping)

    for name, method, what in (
        ("start", "Start", "start a unit's stopped or fatal instances, or one instance"),
        ("stop", "Stop", "stop a unit's instances, or one instance"),
        ("restart", "Restart", "replace a unit's processes one at a time, or one instance's"),
    ):
        p = command(name, help=what)
        target(p, "name", metavar="UNIT|INSTANCE")
        json_opt(p, "print the instances as JSON")
        progress_opt(p)
        if name == "stop":
            p.add_argument("--grace", type=float, default=0.0, help="seconds before SIGKILL")
        address_opt(p, "the kernel to ask")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
        p.set_defaults(func=_action(method))

    p = command("scale", help="run exactly N instances of a unit")
    target(p, "unit")
    p.add_argument("count", type=_non_negative, metavar="N")
    json_opt(p, "print the instances as JSON")
    progress_opt(p)
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p.set_defaults(func=cmd_scale)

    p = command("endpoints", help="where an interface is served and how calls are routed")
    p.add_argument("interface", help="a full service name, e.g. hsu.echo.v1.Echo")
    p.add_argument("--ensure", action="store_true", help="start an instance if none is routable")
    p.add_argument("--json", action="store_true", help="print the Resolve reply as JSON")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p.set_defaults(func=cmd_endpoints)

    p = command("reload", help="make a running kernel read its deployment again")
    json_opt(p, "print what changed as JSON")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    p.set_defaults(func=cmd_reload)

    p = command(
        "logs",
        help="a unit's or an instance's output (and the kernel's about it); every unit's,"
        " with a unit column, without a name",
    )
    target(p, "name", metavar="UNIT|INSTANCE", nargs="?", default="")
    json_opt(p, "print JSON lines, one per record")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--tail", type=int, default=100, help="past lines first (default 100)")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=cmd_logs)

    p = command("events", help="state transitions and published events as they happen")
    target(p, "unit", nargs="?", help="only this unit's")
    p.add_argument("--replay", action="store_true", help="first the recent ones")
    json_opt(p, "print JSON lines, one per event")
    p.add_argument(
        "--topic",
        action="append",
        metavar="TOPIC",
        help="only events on this topic (a name or a glob: 'worker.*'); repeatable",
    )
    address_opt(p, "the kernel to ask")
    p.set_defaults(func=cmd_events)

    config = command("config", help="check, show or describe deployments")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    p = csub.add_parser(
        "validate",
        formatter_class=_Formatter,
        help="check a deployment and its plugins; start nothing",
    )
    p.add_argument("deployment", help="deployment file")
    json_opt(p)
    plugin_opt(p)
    set_opt(p)
    p.set_defaults(func=cmd_config_validate)
    p = csub.add_parser(
        "show", formatter_class=_Formatter, help="the effective config, each value with its source"
    )
    p.add_argument("deployment", nargs="?", help="deployment file")
    p.add_argument("--json", action="store_true", help="print JSON")
    plugin_opt(p)
    set_opt(p)
    p.set_defaults(func=cmd_config_show)
    p = csub.add_parser(
        "schema", formatter_class=_Formatter, help="JSON Schema of a deployment, for editors"
    )
    p.add_argument("deployment", nargs="?", help="include the sections of this one's plugins")
    plugin_opt(p)
    p.set_defaults(func=cmd_config_schema)

    p = command(
        "completion", help="print the shell code that completes hsu's commands (argcomplete)"
    )
    p.add_argument("shell", choices=["bash", "zsh", "fish", "tcsh", "powershell"])
    p.set_defaults(func=cmd_completion)

    p = command("new", help="create an HSU or a plugin package that passes its own tests")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    h = kinds.add_parser(
        "hsu",
        formatter_class=_Formatter,
        help="an HSU: a .proto, its code, servicer, deployment, tests",
    )
    h.add_argument("name", metavar="NAME", help="e.g. calc: package calc, interface calc.v1.Calc")
    h.add_argument("--lang", choices=("python", "node"), default="python", help="default python")
    h.add_argument("--dir", help="create it in DIR (default: the current directory)")
    h.set_defaults(func=cmd_new)
    pl = kinds.add_parser(
        "plugin",
        formatter_class=_Formatter,
        help="an hsu plugin distribution: hookimpls, settings, tests",
    )
    pl.add_argument("name", metavar="NAME", help="e.g. audit: distribution hsu-plugin-audit")
    pl.add_argument("--dir", help="create it in DIR (default: the current directory)")
    pl.set_defaults(func=cmd_new)
    return parser


#: the commands that log (the others print, and never import loguru)
LOGGING = {"run", "config", "plugins"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "_ARGCOMPLETE" in os.environ:  # only while the shell completes
        import argcomplete

        argcomplete.autocomplete(build_parser())
    first = argv[0] if argv and not argv[0].startswith("-") else None
    parser = build_parser(only=first)
    args = parser.parse_args(argv)
    if args.command in LOGGING:
        _setup_logging(args.log_level, fmt=args.log_format or "text")
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except KernelUnreachable as exc:
        print(f"hsu: error: {exc}", file=sys.stderr)
        return EXIT["unreachable"]
    except HsuError as exc:
        print(f"hsu: error: {exc}", file=sys.stderr)
        if exc.__cause__ is not None and os.environ.get("HSU_TRACEBACK"):
            raise
        return EXIT["error"]
    except KeyboardInterrupt:
        return EXIT["interrupted"]
    except BrokenPipeError:
        # the reader went away: say nothing more, and let Python's exit not
        # flush into the closed pipe (docs.python.org, "Note on SIGPIPE")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT["broken_pipe"]


__all__ = ["build_parser", "main"]
