"""Auth benchmark: routed calls with no auth, a bearer token, TLS and mTLS, side by side.

Run with ``python bench/auth.py`` (hsu, hsu-echo and ``cryptography``
installed). Four kernels run at once, each with one ``python -m hsu_echo``
instance and a TCP control plane on loopback:

- ``none``: no auth, plaintext;
- ``token``: ``auth: {authenticators: [token], authorizers: [rbac]}``, the
  caller sends ``authorization: Bearer ...``;
- ``tls``: ``kernel.tls`` (server certificate only), no auth: what TLS alone costs;
- ``mtls``: ``kernel.tls`` with ``client_ca``, ``auth: {authenticators: [mtls],
  authorizers: [rbac]}``, the caller presents a client certificate whose
  SPIFFE ID rbac grants the roles.

For each, ``Echo`` calls with 1 and 32 in flight through the gateway (a
grpc.aio stub on the kernel's data address) and through ``hsu.connect``
(which asks the kernel's control plane where the unit is and then calls the
instance itself), in rounds that rotate the order of the kernels so that each
sees the same moments of a noisy machine. It reports calls per second
(median of the rounds), p50/p99 latency, and each mode's throughput relative
to ``none`` in the same run, and replaces the ``## Auth`` section of
``docs/benchmarks.md`` unless ``--no-write``. Everything listens on
127.0.0.1; every process it starts is stopped by pid, and the run fails if
any is still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
from _common import DOC, ROOT, TRACKER, interrupted, reap_leftovers, versions, write_section
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from routing import Window, clean_env, drive, free_port, quantile, stop_process

import hsu
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.tls import TLSConfig, aio_channel
from hsu_echo.v1 import echo_pb2_grpc

HEADING = "## Auth"
INTERFACE = "hsu.echo.v1.Echo"
#: ``none2`` is ``none`` again: the spread between the two is this run's noise
MODES = ("none", "none2", "token", "tls", "mtls", "nginx", "nginx-token")
PATHS = ("gateway", "connect")
CLIENT_ID = "spiffe://bench.local/hsu/client"
MODE_DESC = {
    "none": "no auth, plaintext",
    "none2": "`none` again, a second kernel: its *vs none* is the noise of the run",
    "token": "bearer token (`token` + `rbac`), plaintext",
    "tls": "TLS (server certificate), no auth",
    "mtls": "mTLS (client certificate, `mtls` + `rbac`)",
    "nginx": "the nginx data plane (`hsu_plugins.gateway.nginx`), no auth",
    "nginx-token": "the nginx data plane with `token` + `rbac`: nginx asks the kernel for"
    " every call (`auth_request`); its *vs* column is against `nginx`",
}


# -- certificates ------------------------------------------------------------------


class Pki:
    """A CA and the server, client and HSU certificates of the TLS kernels."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench ca")])
        self.cert = (
            self._builder(name, self.key.public_key(), name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        self.server = self.issue("server", loopback)
        self.client = self.issue("client", x509.UniformResourceIdentifier(CLIENT_ID))
        self.unit = self.issue(
            "unit", x509.UniformResourceIdentifier("spiffe://bench.local/hsu/echo")
        )

    @staticmethod
    def _builder(subject: Any, public_key: Any, issuer: Any) -> Any:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def issue(self, name: str, san: Any) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            self._builder(subject, key.public_key(), self.cert.subject)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{name}.key", pem),
        )


# -- the kernels ----------------------------------------------------------------------


class Kernel:
    """``python -m hsu run`` with one echo instance, in the mode it is named for."""

    def __init__(self, mode: str, pki: Pki, token: str):
        self.mode = mode
        self.dir = Path(tempfile.mkdtemp(prefix=f"hb-auth-{mode}-"))
        self.data = f"127.0.0.1:{free_port()}"
        self.control = f"127.0.0.1:{free_port()}"
        self.token = token if mode in ("token", "nginx-token") else None
        self.tls: TLSConfig | None = None
        if mode == "tls":
            self.tls = TLSConfig(ca=str(pki.ca))
        elif mode == "mtls":
            self.tls = TLSConfig(str(pki.ca), str(pki.client[0]), str(pki.client[1]))
        self.pki = pki
        self.proc: subprocess.Popen[bytes] | None = None

    def deployment(self) -> dict[str, Any]:
        echo: dict[str, Any] = {
            "command": ["python", "-m", "hsu_echo"],
            "interfaces": [INTERFACE],
            "start": "at-start",
            "min_instances": 1,
            "max_instances": 1,
            "stop_grace": 2,
        }
        kernel: dict[str, Any] = {"address": self.data, "control": self.control, "drain_grace": 1}
        out: dict[str, Any] = {"name": f"bench-auth-{self.mode}", "kernel": kernel}
        caller = {"caller": [f"{INTERFACE}/*"]}
        if self.mode in ("tls", "mtls"):
            kernel["tls"] = {"cert": str(self.pki.server[0]), "key": str(self.pki.server[1])}
            cert, key = self.pki.unit
            # the instance registers over the TLS control plane (hsu.worker reads HSU_TLS_*)
            echo["env"] = {"HSU_TLS_CA": str(self.pki.ca), "HSU_TLS_CERT": str(cert),
                           "HSU_TLS_KEY": str(key)}  # fmt: skip
        if self.mode == "mtls":
            kernel["tls"]["client_ca"] = str(self.pki.ca)
            out["auth"] = {"authenticators": ["mtls"], "authorizers": ["rbac"]}
            grant = {"identity": CLIENT_ID, "roles": ["read", "route", "caller"]}
            out["rbac"] = {"roles": caller, "grants": [grant]}
        if self.mode.startswith("nginx"):
            out["plugins"] = ["hsu_plugins.gateway.nginx"]
            out["gateway_nginx"] = {"binary": shutil.which("nginx") or "/usr/sbin/nginx"}
        if self.mode in ("token", "nginx-token"):
            out["auth"] = {"authenticators": ["token"], "authorizers": ["rbac"]}
            entry = {"identity": "bench", "token": "${env:BENCH_TOKEN}"}
            out["token"] = {"tokens": [{**entry, "roles": ["read", "route", "caller"]}]}
            out["rbac"] = {"roles": caller}
        out["units"] = {"echo": echo}
        return out

    def start(self) -> None:
        (self.dir / "deployment.json").write_text(json.dumps(self.deployment(), indent=2))
        out = open(self.dir / "kernel.out", "wb")  # noqa: SIM115 - the child keeps it
        env = clean_env(BENCH_TOKEN=self.token or "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hsu", "run", "deployment.json"],
            cwd=self.dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        out.close()
        TRACKER.add([self.proc.pid])

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "kernel.out").read_text(errors="replace")
        except OSError:
            return "(no kernel output)"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the kernel runs and its echo instance is ready (asked over
        its control plane, with this mode's credentials)."""
        deadline = time.monotonic() + timeout
        async with aio_channel(self.control, self.tls) as ch:
            stub = kernel_pb2_grpc.KernelStub(ch)
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kernel {self.mode} exited:\n{self.log_tail()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    found = await stub.ListInstances(
                        kernel_pb2.ListInstancesRequest(unit="echo"),
                        timeout=1.0,
                        metadata=self.metadata,
                    )
                    ready = [i for i in found.instances if i.state == "ready"]
                    if ready:
                        TRACKER.add(i.pid for i in ready)
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kernel {self.mode}: no ready instance:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, f"kernel {self.mode}")
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# -- measuring ---------------------------------------------------------------------------


Call = Callable[..., Awaitable[Any]]


async def callers(kernel: Kernel, stack: contextlib.AsyncExitStack) -> dict[str, Call]:
    """The Echo method through the gateway and through ``hsu.connect``."""
    gateway = await stack.enter_async_context(aio_channel(kernel.data, kernel.tls))
    routed = await stack.enter_async_context(
        hsu.connect(kernel.control, tls=kernel.tls, token=kernel.token)
    )
    metadata = kernel.metadata

    def with_metadata(method: Call) -> Call:
        async def call(request: Any, **kw: Any) -> Any:
            return await method(request, metadata=metadata, **kw)

        return call

    return {
        "gateway": with_metadata(echo_pb2_grpc.EchoStub(gateway).Echo),
        "connect": echo_pb2_grpc.EchoStub(routed).Echo,
    }


async def measure(
    kernels: dict[str, Kernel], ns: list[int], rounds: int, seconds: float, warmup: float
) -> dict[tuple[str, str, int], list[Window]]:
    out: dict[tuple[str, str, int], list[Window]] = {}
    async with contextlib.AsyncExitStack() as stack:
        calls = {mode: await callers(k, stack) for mode, k in kernels.items()}
        for mode in MODES:
            for path in PATHS:
                await drive(calls[mode][path], 8, warmup, 10**9)
        for r in range(rounds):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            for n in ns:
                for path in PATHS:
                    for mode in order:
                        window = await drive(calls[mode][path], n, seconds, 10**9)
                        out.setdefault((mode, path, n), []).append(window)
            print(f"  round {r + 1}/{rounds} done", flush=True)
    return out


def median(xs: list[float]) -> float:
    ordered = sorted(xs)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def report(
    results: dict[tuple[str, str, int], list[Window]],
    ns: list[int],
    args: argparse.Namespace,
    argv: list[str],
    elapsed: float,
) -> str:
    v = versions("hsu", "grpcio", "cryptography")
    lines = [
        HEADING,
        "",
        f"`python bench/auth.py {' '.join(argv)}`".replace(" `", "`"),
        f"({datetime.date.today()}, {platform.python_implementation()} {platform.python_version()},"
        f" {psutil.cpu_count()} CPUs, hsu {v['hsu']}, grpcio {v['grpcio']},"
        f" cryptography {v['cryptography']}; {elapsed:.0f} s).",
        "",
        f"Echo calls through {len(MODES)} kernels running at once, each with one instance and",
        "a TCP control plane on loopback; rounds rotate the kernels' order. Calls per second are",
        f"the median of {args.rounds} windows of {args.seconds:g} s; latency over every call of",
        "the windows. *vs none*: throughput against `none` (the nginx modes: against `nginx`)",
        "on the same path and concurrency, same run.",
        "",
        "| mode | path | in flight | calls/s | vs none | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in PATHS:
        for n in ns:
            for mode in MODES:
                against = "nginx" if mode.startswith("nginx") else "none"
                base = median([w.rate for w in results[(against, path, n)]])
                windows = results[(mode, path, n)]
                rate = median([w.rate for w in windows])
                lat = [x for w in windows for x in w.latencies]
                rel = "" if mode == against else f"{(rate / base - 1) * 100:+.1f} %"
                lines.append(
                    f"| {mode} | {path} | {n} | {rate:,.0f} | {rel} |"
                    f" {quantile(lat, 0.5) * 1e3:.2f} | {quantile(lat, 0.99) * 1e3:.2f} |"
                )
    lines += [
        "",
        "Modes: " + "; ".join(f"`{m}`: {d}" for m, d in MODE_DESC.items()) + ".",
        "The gateway authenticates each connection once and reuses the identity for",
        "`auth.cache_ttl` seconds per connection and credential, so a call pays a dictionary",
        "lookup and the authorizer; `hsu.connect` is authenticated when it resolves the",
        "interface and follows its endpoints, then calls the instance itself.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inflight", default="1,32", help="comma separated")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    ns = [int(x) for x in args.inflight.split(",")]
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="hb-auth-pki-"))
    kernels: dict[str, Kernel] = {}
    failed: BaseException | None = None
    try:
        pki = Pki(folder)
        token = secrets.token_urlsafe(32)
        kernels = {mode: Kernel(mode, pki, token) for mode in MODES}
        for k in kernels.values():
            k.start()

        async def run() -> dict[tuple[str, str, int], list[Window]]:
            await asyncio.gather(*(k.wait_ready() for k in kernels.values()))
            print(f"measuring {', '.join(MODES)} x {', '.join(PATHS)} at {ns} in flight")
            return await measure(kernels, ns, args.rounds, args.seconds, args.warmup)

        results = asyncio.run(run())
    except BaseException as exc:
        failed = exc
        raise
    finally:
        for k in kernels.values():
            k.stop()
        shutil.rmtree(folder, ignore_errors=True)
        reap_leftovers(failed)
    body = report(results, ns, args, argv, time.monotonic() - started)
    print()
    print(body)
    print(f"no process left behind ({len(TRACKER.seen)} tracked)")
    if not args.no_write:
        write_section(body, HEADING)
        print(f"wrote the {HEADING!r} section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
