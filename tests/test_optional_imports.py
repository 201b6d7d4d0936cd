"""An installed plugin distribution costs a kernel that does not use it nothing
heavy: its entry point is loaded and its hooks registered, but the library it
integrates (PyJWT and cryptography, aetcd, redis, OpenTelemetry) is imported
only once a deployment configures it (docs/benchmarks.md, Footprint). Nor does
the kernel load, for a deployment that does not use them, the modules it
imports where they are needed (reflection's descriptors, TOML, http.client)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import hsu_env, wait_until, write_deployment

#: the contrib distributions whose entry points the kernel must have loaded
#: (CI installs every one of them): without them the test would prove nothing
LOADED = ("hsu_plugin_jwt", "hsu_plugin_etcd", "hsu_plugin_redis", "hsu_plugin_otel")
#: what none of them may import until it is configured
HEAVY = ("jwt", "cryptography", "aetcd", "redis", "opentelemetry")
#: what the kernel loads only on the path that needs it: descriptor_pb2 and
#: grpcio's reflection servicer at the first reflection call, tomllib for a
#: .toml file, the idna codec for a non-ASCII host name, http.client when the
#: influxdb exporter writes, email.parser for a distribution's full metadata,
#: hashlib/hmac/secrets (and OpenSSL's _hashlib) where a digest is made:
#: ids and tokens come from os.urandom; difflib for a "did you mean"
ON_DEMAND = (
    "google.protobuf.descriptor_pb2",
    "grpc_reflection.v1alpha.reflection",
    "tomllib",
    "encodings.idna",
    "http.client",
    "email.parser",
    "hashlib",
    "_hashlib",
    "hmac",
    "secrets",
    "difflib",
)

CODE = """
import atexit, sys
from hsu._kernel import cli
atexit.register(lambda: print("MODULES", *sorted(sys.modules), flush=True))
sys.exit(cli.main(["run", sys.argv[1], "--control", sys.argv[2]]))
"""


def test_installed_plugins_do_not_import_their_libraries_until_configured(tmp_path: Path):
    dep = write_deployment(
        tmp_path / "deployment.yaml",
        "name: lean\n"
        "kernel:\n  address: 127.0.0.1:0\n"
        "units:\n  s:\n    kind: managed\n    command: [sleep, '1e6']\n    start: at-start\n",
    )
    control = f"unix:{tmp_path / 'control.sock'}"
    env = hsu_env()
    del env["HSU_DISABLE_PLUGIN_AUTOLOAD"]  # every installed distribution, as in production
    proc = subprocess.Popen(
        [sys.executable, "-c", CODE, str(dep), control],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:

        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            status = [sys.executable, "-m", "hsu", "status", "--control", control]
            return subprocess.run(status, capture_output=True, env=env, timeout=30).returncode == 0

        wait_until(ready)  # the kernel runs and its instance is ready
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    modules = out.split("MODULES", 1)[1].split()
    assert [d for d in LOADED if d not in modules] == []
    heavy = [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == []
    assert [m for m in ON_DEMAND if m in modules] == []
