"""Tracing benchmark: what tracing a routed call costs, this tree against another.

Run with ``python bench/tracing.py --before DIR``, where DIR holds the source
tree of another revision (``git archive main | tar -x -C DIR``): the kernels
(and their HSUs) of the *before* variants import hsu, its built-in plugins,
hsu-echo and hsu-plugin-otel from DIR (``PYTHONPATH``), the others from this
tree. ``Echo`` with no delay, ``--inflight`` calls at a time, through each
kernel's gateway (a plain stub on its address), in rotating rounds of windows
run back to back, on four kernels with one echo instance each:

- *untraced*: calls without trace context;
- *traceparent*: every call carries a sampled W3C ``traceparent`` (the
  kernel makes its span of the call, and in this tree records its parts: a
  pick and an attempt per call, the attempt's span sent to the instance);
  no exporter;
- *traceparent + otel*: the same on a kernel with ``kernel.exporters:
  [otel]`` sending its spans over OTLP/gRPC to a discarding receiver in a
  process of its own (before: the call's span; now: the call's, its pick's
  and its attempt's);
- *now: traceparent + otel, no picks*: the same with ``otel.picks: false``
  (the call's and its attempt's spans).

Also, in this process: the call loop (``hsu.client.route.Tries.call_async``
on a route with one instance and an attempt that returns at once), untraced
and traced, best of 5 runs of ``--number``, under each tree (a child
process per tree). It prints the results; nothing is written. Everything
listens on 127.0.0.1 or a unix socket in a temp dir; every process it starts
is stopped by pid, and the run fails if one is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from _common import ROOT, TRACKER, reap_leftovers
from metrics import PLAIN, KernelProc, ReceiverProc, clean_env, echo_unit, has_otel, window

from hsu_echo.v1 import echo_pb2_grpc

#: the call loop alone, timed in a child process under one tree; prints JSON
LOOP = """
import asyncio, json, sys, time
from hsu.client.route import Caller, Policy, Route, Tries, load_plugins
from hsu.ports import Endpoint
from hsu import tracecontext

number = int(sys.argv[1])
route = Route("hsu.echo.v1.Echo", Policy(unit="echo"), load_plugins())
route.replace([Endpoint(instance_id="echo-1", unit="echo", address="127.0.0.1:1",
                        interfaces=("hsu.echo.v1.Echo",))])
caller = Caller(lambda r: RuntimeError("no instance"), observe=lambda *a: None)
traced = hasattr(tracecontext, "CallTrace")
md = tracecontext.SpanContext.new().metadata()

async def attempt(ep):
    return b""

async def ensure(r, left):
    return r

async def run(trace):
    t = time.perf_counter()
    for _ in range(number):
        if trace:
            span = tracecontext.from_metadata(md).child()
            kw = {"trace": tracecontext.CallTrace(span)} if traced else {}
        else:
            kw = {}
        tries = Tries(caller, route, "/hsu.echo.v1.Echo/Echo", None, deadline=None,
                      retries=True, **kw)
        await tries.call_async(attempt, ensure)
    return (time.perf_counter() - t) / number

async def main():
    out = {}
    for name, trace in (("untraced", False), ("traced", True)):
        await run(trace)
        out[name] = min([await run(trace) for _ in range(5)])
    print(json.dumps(out))

asyncio.run(main())
"""


def tree_env(before: Path | None) -> dict[str, str]:
    env = clean_env()
    if before is not None:
        paths = [
            before / "kernel",
            before / "plugins",
            before / "contrib" / "hsu-echo",
            before / "contrib" / "hsu-plugin-otel",
        ]
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


class TreeKernel(KernelProc):
    """A :class:`KernelProc` whose kernel and HSUs import from one tree."""

    def __init__(self, tag: str, before: Path | None, otel: str = "", picks: bool = True) -> None:
        super().__init__(tag, echo_unit("echo", metrics=True), otel=otel)
        self.env = tree_env(before)
        if not picks:
            self.text = self.text.replace(
                f"  endpoint: {otel}\n", f"  endpoint: {otel}\n  picks: false\n"
            )

    def start(self) -> None:
        (self.dir / "deployment.yaml").write_text(self.text)
        out = open(self.dir / "kernel.out", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hsu", "run", "deployment.yaml"],
            cwd=self.dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        out.close()
        TRACKER.add([self.proc.pid])
        self.channel = grpc.insecure_channel(self.control, options=PLAIN)


def loop_costs(before: Path | None, number: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", LOOP, str(number)],
        env=tree_env(before),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def throughput(
    before: Path, inflight: int, rounds: int, seconds: float
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    otel = has_otel()
    receivers: dict[str, ReceiverProc] = {}
    kernels: dict[str, TreeKernel] = {}
    for tree, path in (("before", before), ("now", None)):
        kernels[tree] = TreeKernel(f"trace-{tree}", path)
        if otel:
            receivers[tree] = ReceiverProc()
            kernels[f"{tree} otel"] = TreeKernel(
                f"trace-{tree}-otel", path, otel=receivers[tree].endpoint
            )
    if otel:
        receivers["now, no picks"] = ReceiverProc()
        kernels["now otel-no-picks"] = TreeKernel(
            "trace-now-nopicks", None, otel=receivers["now, no picks"].endpoint, picks=False
        )
    variants: list[tuple[str, str, bool]] = []
    for tree in ("before", "now"):
        variants += [(f"{tree}: untraced", tree, False), (f"{tree}: traceparent", tree, True)]
        if otel:
            variants.append((f"{tree}: traceparent + otel", f"{tree} otel", True))
    if otel:
        variants.append(("now: traceparent + otel, no picks", "now otel-no-picks", True))
    raw: dict[str, list[tuple[float, float]]] = {}
    spans: dict[str, int] = {}
    try:
        for k in kernels.values():
            k.start()
        for k in kernels.values():
            await asyncio.to_thread(k.ready, 1)
            k.watch_children()
        channels = {
            name: grpc.aio.insecure_channel(k.address, options=PLAIN) for name, k in kernels.items()
        }
        try:
            stubs = {name: echo_pb2_grpc.EchoStub(ch) for name, ch in channels.items()}
            for _, kname, traced in variants:  # warm up
                await window(stubs[kname], kernels[kname], inflight, 0.3, traced)
            for r in range(rounds):
                at = r % len(variants)
                for variant, kname, traced in variants[at:] + variants[:at]:
                    got = await window(stubs[kname], kernels[kname], inflight, seconds, traced)
                    raw.setdefault(variant, []).append(got)
        finally:
            for ch in channels.values():
                await ch.close()
    finally:
        for k in kernels.values():
            k.stop()
        for tree, rec in receivers.items():
            spans[tree] = rec.stop()
    out: dict[str, dict[str, float]] = {}
    for variant, xs in raw.items():
        tree = variant.partition(":")[0]
        base = raw[f"{tree}: untraced"]
        out[variant] = {
            "rate": statistics.median(r for r, _ in xs),
            "cpu": statistics.median(c for _, c in xs),
            "rate/untraced": statistics.median(a[0] / b[0] for a, b in zip(xs, base, strict=True)),
            "cpu/untraced": statistics.median(a[1] / b[1] for a, b in zip(xs, base, strict=True)),
        }
    return out, spans


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="another revision's source tree")
    ap.add_argument("--inflight", type=int, default=32, help="calls in flight (default 32)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    ap.add_argument("--seconds", type=float, default=0.5, help="s per window (default 0.5)")
    ap.add_argument("--number", type=int, default=20_000, help="calls per loop timing")
    args = ap.parse_args(argv)
    before = args.before.resolve()
    if not (before / "kernel" / "hsu" / "__init__.py").is_file():
        ap.error(f"--before {before}: no kernel/hsu/__init__.py there")
    if before == ROOT.resolve():
        ap.error("--before is this tree")
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    failed: BaseException | None = None
    try:
        for tree, path in (("before", before), ("now", None)):
            costs = loop_costs(path, args.number)
            print(
                f"call loop, {tree}: "
                + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in costs.items()),
                flush=True,
            )
        t = time.monotonic()
        result, spans = asyncio.run(throughput(before, args.inflight, args.rounds, args.seconds))
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    print(
        f"gateway, {args.inflight} in flight, {args.rounds} rounds of {args.seconds:g} s"
        f" windows ({time.monotonic() - t:.0f} s); load average at end:"
        f" {os.getloadavg()[0]:.2f}"
    )
    print("| variant | calls/s | vs untraced | CPU/call (kernel + HSU) | vs untraced |")
    print("| --- | --- | --- | --- | --- |")
    for variant, d in result.items():
        print(
            f"| {variant} | {d['rate']:.0f} | {d['rate/untraced']:.3f}x"
            f" | {d['cpu'] * 1e6:.0f} us | {d['cpu/untraced']:.3f}x |"
        )
    for tree, n in spans.items():
        print(f"spans received ({tree}): {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
