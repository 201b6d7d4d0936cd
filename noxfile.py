"""Sessions: `nox` runs lint, typecheck and tests; `nox -s proto` regenerates code;
`nox -s docs` builds the docs site."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "docs", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

LOCAL = [
    "-e", ".",
    "-e", "contrib/hsu-echo",
    "-e", "contrib/hsu-plugin-jwt",
    "-e", "contrib/hsu-plugin-influxdb",
    "-e", "contrib/hsu-plugin-etcd",
    "-e", "contrib/hsu-plugin-redis",
    "-e", "contrib/hsu-plugin-otel",
]  # fmt: skip


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite: unit tests and integration tests with real processes."""
    session.install(*LOCAL, "-e", ".[dev]")
    # Four workers on two cores: the tests mostly wait on real processes and
    # sockets. Arguments replace the default (`nox -s tests -- tests/test_x.py`).
    session.run("pytest", *(session.posargs or ["-n", "4"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the kernel and the built-in plugins."""
    session.install(*LOCAL, "-e", ".[dev]")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site (mkdocs.yml) with --strict: a broken link, a
    missing page or a docstring the API reference cannot render fails it.
    A default session (CI runs it); not a test, as it needs the docs extra."""
    session.install("-e", ".[docs]")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate the gRPC code, proto/ -> kernel/ and contrib/hsu-echo/proto/ ->
    contrib/hsu-echo/ (scripts/gen_protos.py); commit the result."""
    session.install("grpcio-tools==1.85.1", "mypy-protobuf>=3.6")
    session.run("python", "scripts/gen_protos.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Supervision side by side with supervisor and circus, then routing against raw
    grpcio (bench/routing.py), then failover under kills (bench/failover.py), then
    routed calls with no auth, a token, TLS and mTLS (bench/auth.py), then jobs on
    instances with max_inflight 1 and the queue's overhead (bench/pool.py), then etcd
    (bench/etcd.py), then storage get/put against sqlite3 and redis-py straight to the
    store (bench/storage.py), then cached routed calls against uncached ones
    (bench/cache.py), then memory, idle CPU, launch and CLI times at 1 and 1000
    programs (bench/footprint.py), then what metrics and trace context cost
    (bench/metrics.py); each updates its section of docs/benchmarks.md.

    Not in the default sessions. supervisor and circus are installed only here.
    """
    # A regular (not editable) install, as in production: pip byte-compiles it,
    # as it does supervisor and circus. An editable hsu under
    # PYTHONDONTWRITEBYTECODE=1 would compile every module at every start.
    session.install(".", "./contrib/hsu-echo", "supervisor", "circus", "psutil", "cryptography")
    session.install("--force-reinstall", "--no-deps", ".", "./contrib/hsu-echo")
    # posargs go to the supervision bench, except --no-write, which goes to both
    session.run("python", "bench/supervision.py", *session.posargs)
    routing_args = [a for a in session.posargs if a == "--no-write"]
    session.run("python", "bench/routing.py", *routing_args)
    session.run("python", "bench/failover.py", *routing_args)
    session.run("python", "bench/auth.py", *routing_args)
    session.run("python", "bench/pool.py", *routing_args)
    session.run("python", "bench/cache.py", *routing_args)
    session.run("python", "bench/footprint.py", *routing_args)
    # metrics on against off, a scrape of 1,000 instances, the exporter's RSS
    # (with hsu-plugin-otel installed it adds a kernel exporting spans over OTLP)
    session.install("prometheus-client>=0.20", "./contrib/hsu-plugin-otel")
    session.run("python", "bench/metrics.py", *routing_args)
    # etcd: Debian's etcd-server; the plugin installed like hsu
    session.install("./contrib/hsu-plugin-etcd")
    session.run("python", "bench/etcd.py", *routing_args)
    # storage: sqlite and redis over the Storage service against sqlite3 and
    # redis-py straight to the store; Debian's redis-server
    session.install("./contrib/hsu-plugin-redis")
    session.run("python", "bench/storage.py", *routing_args)
