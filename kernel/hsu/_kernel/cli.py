"""The ``hsu`` command: run a kernel, inspect plugins, talk to a running kernel."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from loguru import logger

from hsu._kernel.config.model import load_deployment
from hsu._kernel.plugins import PluginManager
from hsu._version import __version__
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.errors import HsuError
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

LOG_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[where]}</cyan>{message}"
)


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
    from hsu._kernel import control

    return control.resolve(args.control, kernel=args.kernel, deployment=args.deployment)


# -- commands ----------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
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
    asyncio.run(kernel.serve())
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    explicit = list(args.plugin)
    if args.deployment:
        explicit = [*load_deployment(args.deployment).plugins, *explicit]
    pm = PluginManager.load(explicit)
    infos = pm.infos()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    for i in infos:
        dist = f"{i.distribution} {i.version}".strip() or "-"
        print(f"{i.name:<20} {i.status:<8} {i.source:<10} {dist}")
        for kind, names in i.provides.items():
            print(f"{'':<20} {kind}: {', '.join(names)}")
        if i.hooks:
            print(f"{'':<20} hooks: {', '.join(i.hooks)}")
        if i.error:
            print(f"{'':<20} error: {i.error}")
    return 0


def _client_tls(args: argparse.Namespace) -> Any:
    """``--ca``/``--cert``/``--key`` (or ``HSU_TLS_*``) as a ``TLSConfig``; None without them."""
    from hsu.tls import ENV, TLSConfig

    given = {f: getattr(args, f, None) for f in ("ca", "cert", "key")}
    given["server_name"] = os.environ.get(ENV["server_name"]) or None
    return TLSConfig(**given) if any(given.values()) else None


def _call(address: str, fn: Any, timeout: float, args: argparse.Namespace) -> Any:
    from hsu.client.credentials import BearerInterceptor, bearer
    from hsu.tls import channel as tls_channel

    try:
        with tls_channel(address, _client_tls(args)) as channel:
            token = bearer(None, getattr(args, "token_file", None))
            if token:
                return fn(grpc.intercept_channel(channel, BearerInterceptor(token)), timeout)
            return fn(channel, timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.UNAVAILABLE:
            raise HsuError(f"no kernel answers at {address}: is `hsu run` running?") from None
        raise HsuError(f"kernel at {address}: {code.name}: {exc.details()}") from None


def cmd_status(args: argparse.Namespace) -> int:
    address = _kernel_address(args)

    def fetch(channel: grpc.Channel, timeout: float) -> tuple[Any, Any]:
        stub = kernel_pb2_grpc.KernelStub(channel)
        return (
            stub.Status(kernel_pb2.StatusRequest(), timeout=timeout),
            stub.ListInstances(kernel_pb2.ListInstancesRequest(), timeout=timeout),
        )

    status, listing = _call(address, fetch, args.timeout, args)
    if args.json:
        out = {
            "status": json_format.MessageToDict(status, preserving_proto_field_name=True),
            "instances": [
                json_format.MessageToDict(i, preserving_proto_field_name=True)
                for i in listing.instances
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"kernel {status.deployment}: {status.state} at {status.address}"
        f" (pid {status.pid}, hsu {status.version})"
    )
    if not listing.instances:
        print("no instances")
    for i in listing.instances:
        _print_instance(i)
    return 0


def _print_instance(i: Any) -> None:
    extra = f" restarts {i.restarts}" if i.restarts else ""
    if i.state in ("backoff", "fatal", "stopped") and i.last_exit:
        extra += f"  ({i.last_exit.splitlines()[0]})"
    print(
        f"  {i.instance_id:<24} {i.state:<9} pid {i.pid or '-':<8} {i.address or '-':<22}"
        f" {', '.join(i.interfaces)}{extra}"
    )


def _target(args: argparse.Namespace) -> kernel_pb2.TargetRequest:
    if args.name in ("", None):
        raise HsuError("give a unit name or an instance id")
    # an instance id is "<unit>-<8 hex digits>"
    head, _, tail = args.name.rpartition("-")
    is_instance = bool(head) and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail)
    return kernel_pb2.TargetRequest(
        unit="" if is_instance else args.name,
        instance_id=args.name if is_instance else "",
        grace=getattr(args, "grace", 0.0) or 0.0,
    )


def _action(method: str) -> Any:
    def cmd(args: argparse.Namespace) -> int:
        request = _target(args)

        def go(channel: grpc.Channel, timeout: float) -> Any:
            stub = kernel_pb2_grpc.KernelStub(channel)
            return getattr(stub, method)(request, timeout=timeout)

        reply = _call(_kernel_address(args), go, args.timeout, args)
        for i in reply.instances:
            _print_instance(i)
        return 0

    return cmd


def cmd_scale(args: argparse.Namespace) -> int:
    def go(channel: grpc.Channel, timeout: float) -> Any:
        stub = kernel_pb2_grpc.KernelStub(channel)
        request = kernel_pb2.ScaleRequest(unit=args.unit, count=args.count)
        return stub.Scale(request, timeout=timeout)

    reply = _call(_kernel_address(args), go, args.timeout, args)
    for i in reply.instances:
        _print_instance(i)
    return 0


def cmd_endpoints(args: argparse.Namespace) -> int:
    def go(channel: grpc.Channel, timeout: float) -> Any:
        request = kernel_pb2.ResolveRequest(interface=args.interface, ensure=args.ensure)
        return kernel_pb2_grpc.KernelStub(channel).Resolve(request, timeout=timeout)

    reply = _call(_kernel_address(args), go, args.timeout, args)
    p = reply.policy
    if args.json:
        print(
            json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2)
        )
        return 0
    print(
        f"{args.interface}: unit {p.unit}, balancer {p.balancer}, breaker {p.breaker},"
        f" idempotent: {', '.join(p.idempotent) or 'none'}"
    )
    if not reply.endpoints:
        print("  no instance (a call starts one; --ensure starts one now)")
    for e in reply.endpoints:
        print(f"  {e.instance_id:<24} {e.state:<10} {e.address:<24} weight {e.weight}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    def go(channel: grpc.Channel, timeout: float) -> Any:
        return kernel_pb2_grpc.KernelStub(channel).Reload(
            kernel_pb2.ReloadRequest(), timeout=timeout
        )

    reply = _call(_kernel_address(args), go, args.timeout, args)
    print(f"reloaded: {reply.summary}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    address = _kernel_address(args)
    target = _target(args)
    request = core_pb2.StreamLogsRequest(
        tail=args.tail,
        follow=args.follow,
        unit=target.unit,
        instance_id=target.instance_id,
    )

    def follow(channel: grpc.Channel, timeout: float) -> None:
        stub = core_pb2_grpc.CoreStub(channel)
        for rec in stub.StreamLogs(request, timeout=None if args.follow else timeout):
            where = rec.extra.get("instance", "")
            stream = f" {rec.stream}" if rec.stream else ""
            stamp = time.strftime("%H:%M:%S", time.localtime(rec.time.seconds))
            print(f"{stamp} [{where}{stream}] {rec.message}", flush=True)

    _call(address, follow, args.timeout, args)
    return 0


def _event_dict(ev: kernel_pb2.Event) -> dict[str, Any]:
    return json_format.MessageToDict(ev, preserving_proto_field_name=True)


def cmd_events(args: argparse.Namespace) -> int:
    address = _kernel_address(args)
    request = kernel_pb2.WatchEventsRequest(
        unit=args.unit or "", replay=args.replay, topics=args.topic or ()
    )

    def follow(channel: grpc.Channel, timeout: float) -> None:
        for ev in kernel_pb2_grpc.KernelStub(channel).WatchEvents(request):
            if ev.lost:
                print(f"... {ev.lost} events lost (this reader fell behind)", flush=True)
                continue
            if args.json:
                print(json.dumps(_event_dict(ev)), flush=True)
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(ev.at.seconds))
            who = ev.instance_id or ev.kind
            move = f"  {ev.from_state} -> {ev.to_state}" if ev.to_state else ""
            data = "".join(f" {k}={v!r}" for k, v in sorted(ev.data.items()))
            reason = f"  ({ev.reason})" if ev.reason else ""
            print(f"{stamp} #{ev.seq} {ev.topic} {who}:{move}{data}{reason}", flush=True)

    _call(address, follow, 0.0, args)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    address = _kernel_address(args)

    def ping(channel: grpc.Channel, timeout: float) -> float:
        stub = core_pb2_grpc.CoreStub(channel)
        t0 = time.perf_counter()
        stub.Ping(core_pb2.PingRequest(payload=b"hsu"), timeout=timeout, wait_for_ready=False)
        return time.perf_counter() - t0

    elapsed = _call(address, ping, args.timeout, args)
    print(f"pong from {address} in {elapsed * 1000:.2f} ms")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    """Check a deployment without starting anything."""
    from hsu._kernel.config import loader as config_loader

    ctx = config_loader.context([args.deployment], args.set)
    deployment, _ = config_loader.validate(ctx, args.plugin)
    print(f"{args.deployment}: ok ({len(deployment.units)} units)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from hsu._kernel.config import loader as config_loader

    ctx = config_loader.context([args.deployment] if args.deployment else [], args.set)
    deployment, settings = config_loader.validate(ctx, args.plugin)
    rows = config_loader.show(deployment, settings)
    print(json.dumps(rows, indent=2) if args.json else config_loader.format_rows(rows))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from hsu._kernel.config import loader as config_loader
    from hsu._kernel.config.schema import deployment_schema, plugin_choices

    explicit = list(args.plugin)
    if args.deployment:
        deployment, _ = config_loader.load(config_loader.context([args.deployment]), explicit)
        explicit = [*deployment.plugins, *explicit]
    plugins = PluginManager.load(explicit)
    schema = deployment_schema(plugins.settings_classes(), **plugin_choices(plugins))
    print(json.dumps(schema, indent=2))
    return 0


# -- parser -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsu", description=__doc__)
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

    def set_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help="override one value, e.g. units.echo.stop_grace=3 (wins over file and env)",
        )

    p = sub.add_parser("run", help="start a kernel for a deployment and serve until stopped")
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

    p = sub.add_parser("plugins", help="list plugins: name, distribution, hooks, status")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--deployment", help="also load this deployment's plugin list")
    plugin_opt(p)
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("status", help="a running kernel's state and instances")
    address_opt(p, "the kernel to ask")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ping", help="round trip to a running kernel's Core.Ping")
    address_opt(p, "the kernel to ping")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.set_defaults(func=cmd_ping)

    for name, method, what in (
        ("start", "Start", "start a unit's stopped or fatal instances, or one instance"),
        ("stop", "Stop", "stop a unit's instances, or one instance"),
        ("restart", "Restart", "replace a unit's processes one at a time, or one instance's"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("name", metavar="UNIT|INSTANCE")
        if name == "stop":
            p.add_argument("--grace", type=float, default=0.0, help="seconds before SIGKILL")
        address_opt(p, "the kernel to ask")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
        p.set_defaults(func=_action(method))

    p = sub.add_parser("scale", help="run exactly N instances of a unit")
    p.add_argument("unit")
    p.add_argument("count", type=int, metavar="N")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("endpoints", help="where an interface is served and how calls are routed")
    p.add_argument("interface", help="a full service name, e.g. hsu.echo.v1.Echo")
    p.add_argument("--ensure", action="store_true", help="start an instance if none is routable")
    p.add_argument("--json", action="store_true", help="print the Resolve reply as JSON")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p.set_defaults(func=cmd_endpoints)

    p = sub.add_parser("reload", help="make a running kernel read its deployment again")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("logs", help="a unit's or an instance's output (and the kernel's about it)")
    p.add_argument("name", metavar="UNIT|INSTANCE")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--tail", type=int, default=100, help="past lines first (default 100)")
    address_opt(p, "the kernel to ask")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("events", help="state transitions and published events as they happen")
    p.add_argument("unit", nargs="?", help="only this unit's")
    p.add_argument("--replay", action="store_true", help="first the recent ones")
    p.add_argument(
        "--topic",
        action="append",
        metavar="TOPIC",
        help="only events on this topic (a name or a glob: 'worker.*'); repeatable",
    )
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    address_opt(p, "the kernel to ask")
    p.set_defaults(func=cmd_events)

    config = sub.add_parser("config", help="check, show or describe deployments")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    p = csub.add_parser("validate", help="check a deployment and its plugins; start nothing")
    p.add_argument("deployment", help="deployment file")
    plugin_opt(p)
    set_opt(p)
    p.set_defaults(func=cmd_config_validate)
    p = csub.add_parser("show", help="the effective config, each value with its source")
    p.add_argument("deployment", nargs="?", help="deployment file")
    p.add_argument("--json", action="store_true", help="print JSON")
    plugin_opt(p)
    set_opt(p)
    p.set_defaults(func=cmd_config_show)
    p = csub.add_parser("schema", help="JSON Schema of a deployment, for editors")
    p.add_argument("deployment", nargs="?", help="include the sections of this one's plugins")
    plugin_opt(p)
    p.set_defaults(func=cmd_config_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, fmt=args.log_format or "text")
    try:
        return int(args.func(args))
    except HsuError as exc:
        print(f"hsu: error: {exc}", file=sys.stderr)
        if exc.__cause__ is not None and os.environ.get("HSU_TRACEBACK"):
            raise
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["build_parser", "main"]
