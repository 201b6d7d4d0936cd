"""The `hsu` command's conventions (issue 19): exit codes, --json, logs across
units, completion, progress, lazy imports, and the bugs users hit, each against
a real kernel process."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HSU, ROOT, hsu_env, run_hsu, wait_until, write_deployment
from hsu._kernel.cli import EXIT, build_parser, status_code
from hsu.kernel.v1 import kernel_pb2

pytestmark = pytest.mark.integration

DEPLOYMENT = """\
name: conventions
kernel:
  drain_grace: 120
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    start: at-start
    max_instances: 2
  ghost:
    command: [/nonexistent/hsu-ghost]
    interfaces: [ghost.v1.Ghost]
    restart:
      backoff: {initial: 0.01, max: 0.02}
      crash_loop: {max_failures: 3, window: 60}
"""


@pytest.fixture
def kernel(kernel_process, tmp_path):
    k = kernel_process(write_deployment(tmp_path / "d.yaml", DEPLOYMENT))
    k.wait_ready()
    return k


def hsu(k, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_hsu(*args, "--control", k.address, timeout=timeout)


def status_json(k) -> dict:
    out = hsu(k, "status", "--json")
    return json.loads(out.stdout)


# -- bugs, each a test that failed before its fix ---------------------------------


def test_scale_to_a_negative_count_is_a_usage_error_not_a_traceback():
    out = run_hsu("scale", "echo", "-1", "--control", "unix:/nonexistent/k.sock")
    assert out.returncode == EXIT["usage"] == 2
    assert "Traceback" not in out.stderr
    assert "argument N: must be 0 or more, not -1" in out.stderr


def test_logs_of_an_unknown_unit_say_so_and_follow_does_not_wait(kernel):
    for follow in ([], ["-f"]):
        out = hsu(kernel, "logs", "nosuchunit", *follow, timeout=30)
        assert out.returncode == EXIT["error"]
        assert out.stderr.strip() == (
            "hsu: error: no unit or instance named 'nosuchunit' (units: echo, ghost)"
        )
        assert out.stdout == ""


def test_status_exit_code_says_ready_fatal_or_unreachable(kernel, tmp_path):
    out = hsu(kernel, "status")
    assert out.returncode == EXIT["ok"], out.stdout + out.stderr
    hsu(kernel, "start", "ghost", timeout=60)
    wait_until(lambda: hsu(kernel, "status").returncode == EXIT["fatal"], 60)
    data = status_json(kernel)
    assert data["exit_code"] == EXIT["fatal"] == 4
    assert {i["state"] for i in data["instances"]} == {"ready", "fatal"}
    assert hsu(kernel, "status", "--json").returncode == EXIT["fatal"]
    gone = run_hsu("status", "--control", f"unix:{tmp_path / 'none.sock'}", "--timeout", "2")
    assert gone.returncode == EXIT["unreachable"] == 5
    assert "no kernel answers at" in gone.stderr


def _instance(state: str) -> kernel_pb2.Instance:
    return kernel_pb2.Instance(instance_id=f"u-{state[:8]:0<8}", state=state)


@pytest.mark.parametrize(
    ("kernel_state", "states", "code"),
    [
        ("running", [], 0),
        ("running", ["ready", "ready"], 0),
        ("running", ["ready", "starting"], 3),
        ("running", ["backoff"], 3),
        ("running", ["stopped"], 3),
        ("stopping", ["ready"], 3),
        ("running", ["starting", "fatal"], 4),
    ],
)
def test_status_code_orders_fatal_over_not_ready_over_ready(kernel_state, states, code):
    assert status_code(kernel_state, [_instance(s) for s in states]) == code


def test_plugins_lists_what_the_running_kernel_loaded(kernel_process, tmp_path, plugin_dists):
    env = hsu_env(plugin_dists)
    deployment = write_deployment(
        tmp_path / "d.yaml",
        "name: plugged\nplugins: [good]\nunits: {}\n",
    )
    k = kernel_process(deployment, env)
    k.wait_ready()
    running = run_hsu("plugins", "--json", "--control", k.address, env=env)
    assert running.returncode == 0, running.stderr
    names = {p["name"]: p for p in json.loads(running.stdout)}
    assert names["good"]["source"] == "explicit" and names["good"]["status"] == "active"
    assert names["balancers"]["provides"]["balancer"]  # provides crosses the wire
    # found by itself when it is the one running kernel, too
    found = run_hsu("plugins", "--json", env=hsu_env(plugin_dists))
    assert "good" in {p["name"] for p in json.loads(found.stdout)}
    local = run_hsu("plugins", "--json", "--local", env=env)
    assert "good" not in {p["name"] for p in json.loads(local.stdout)}


def test_a_port_in_use_gets_hsus_message_and_no_grpc_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = write_deployment(tmp_path / "d.yaml", "name: busy\nunits: {}\n")
        out = run_hsu(
            "run", str(d), "--address", f"127.0.0.1:{port}",
            "--control", f"unix:{tmp_path / 'k.sock'}",
        )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[-1] == (
        f"hsu: error: kernel.address: cannot listen on 127.0.0.1:{port}:"
        " Address already in use; is it in use?"
    )
    # nothing but hsu's own records: grpc's C core logs "E1201 12:00:00.0 ... file.cc:12]"
    assert all(" INFO " in line or " ERROR " in line for line in lines[:-1]), lines


def test_a_missing_executable_is_logged_once_per_attempt(kernel):
    hsu(kernel, "start", "ghost")
    wait_until(lambda: hsu(kernel, "status").returncode == EXIT["fatal"], 60)
    [ghost] = [i for i in status_json(kernel)["instances"] if i["instance_id"].startswith("ghost")]
    attempts = int(ghost.get("restarts", 0)) + 1
    _, err = kernel.output()
    said = [
        line
        for line in err.splitlines()
        if "executable '/nonexistent/hsu-ghost' not found" in line and "crash loop" not in line
    ]
    assert attempts >= 3
    assert len(said) == attempts - 1, said  # each retry once; the last is the crash loop's line


def test_an_open_events_or_logs_stream_does_not_hold_the_kernels_stop(kernel):
    streams = [
        subprocess.Popen(
            [*HSU, *args, "--control", kernel.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=hsu_env(),
            cwd=ROOT,
        )
        for args in (["events", "--replay"], ["logs", "-f"])
    ]
    try:
        for s in streams:
            assert s.stdout is not None
            assert s.stdout.readline()  # connected: it printed a first line
        kernel.proc.send_signal(signal.SIGTERM)
        # the drain grace is 120 s: a stream that held the stop would hold it that long
        assert kernel.proc.wait(timeout=60) == 0
        for s in streams:
            assert s.wait(timeout=30) == 0
            assert "Traceback" not in (s.stderr.read() if s.stderr else "")
    finally:
        for s in streams:
            if s.poll() is None:
                s.kill()
                s.wait()


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run hsu with stdout a pipe whose reader is already gone (`| head -0`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [*HSU, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=hsu_env(),
            cwd=ROOT,
            timeout=60,
        )
    finally:
        os.close(write)
    return proc


def test_a_reader_that_goes_away_gets_no_traceback(kernel):
    for args in (["status", "--control", kernel.address], ["plugins", "--local"]):
        out = _closed_pipe_run(*args)
        assert out.stderr == ""
        assert out.returncode == EXIT["broken_pipe"] == 141
    # and through a real shell pipe
    shell = subprocess.run(
        f"{sys.executable} -m hsu status --control {kernel.address} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=hsu_env(),
        timeout=60,
    )
    assert shell.stdout.startswith("kernel conventions: running")
    assert "Traceback" not in shell.stderr


# -- conventions ------------------------------------------------------------------


def test_every_read_command_speaks_json(kernel):
    assert status_json(kernel)["status"]["deployment"] == "conventions"
    ping = json.loads(hsu(kernel, "ping", "--json").stdout)
    assert ping["address"] == kernel.address and ping["ms"] > 0
    ends = json.loads(hsu(kernel, "endpoints", "hsu.echo.v1.Echo", "--json").stdout)
    assert ends["policy"]["unit"] == "echo"
    logs = [json.loads(line) for line in hsu(kernel, "logs", "--json").stdout.splitlines()]
    assert logs and {"time", "unit", "instance", "stream", "level", "message"} <= set(logs[0])
    assert "echo" in {r["unit"] for r in logs}
    events = subprocess.Popen(
        [*HSU, "events", "--replay", "--json", "--control", kernel.address],
        stdout=subprocess.PIPE,
        text=True,
        env=hsu_env(),
        cwd=ROOT,
    )
    try:
        assert events.stdout is not None
        first = json.loads(events.stdout.readline())
        assert first["kind"] in ("kernel", "instance") and int(first["seq"]) >= 1
    finally:
        events.terminate()
        events.wait(10)
    d = ROOT / "contrib" / "hsu-echo" / "deployment.yaml"
    valid = json.loads(run_hsu("config", "validate", str(d), "--json").stdout)
    assert valid == {"deployment": str(d), "ok": True, "units": ["echo"]}
    assert "kernel" in {p["name"] for p in json.loads(hsu(kernel, "plugins", "--json").stdout)}


def test_logs_of_every_unit_have_a_unit_column_sized_to_the_data(kernel):
    hsu(kernel, "start", "ghost")
    wait_until(lambda: hsu(kernel, "status").returncode == EXIT["fatal"], 60)
    lines = hsu(kernel, "logs").stdout.splitlines()
    units = {line.split()[1] for line in lines}
    assert {"echo", "ghost"} <= units
    # the message column starts at the same place on every line
    starts = {line.index("[") for line in lines}
    assert len(starts) == 1, lines
    one = hsu(kernel, "logs", "ghost").stdout.splitlines()
    assert one and all(line.split()[1].startswith("[ghost-") for line in one)


def test_status_columns_are_sized_to_their_data(kernel):
    lines = hsu(kernel, "status").stdout.splitlines()
    header, row = lines[1], lines[2]
    assert header.split()[:3] == ["INSTANCE", "STATE", "PID"]
    instance = row.split()[0]
    assert instance.startswith("echo-")
    # INSTANCE is as wide as its widest cell, plus the two-space gap
    assert header.index("STATE") == len(instance) + 2
    assert not any(line.endswith(" ") for line in lines)


def test_scale_prints_progress_on_stderr_while_it_waits(kernel):
    out = hsu(kernel, "scale", "echo", "2", "--progress")
    assert out.returncode == 0, out.stderr
    assert " -> ready" in out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith("echo-")]) == 2
    quiet = hsu(kernel, "scale", "echo", "1")  # not a terminal: no progress
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_completion_names_the_running_kernels_units(kernel, tmp_path):
    result = tmp_path / "completions"
    line = f"hsu logs --control {kernel.address} "
    env = hsu_env(
        _ARGCOMPLETE="1",
        _ARGCOMPLETE_IFS="\n",
        _ARGCOMPLETE_STDOUT_FILENAME=str(result),
        COMP_LINE=line,
        COMP_POINT=str(len(line)),
    )
    out = subprocess.run(
        [sys.executable, "-m", "hsu"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    names = result.read_text().split("\n")
    assert "echo" in names and "ghost" in names
    assert any(n.startswith("echo-") for n in names)  # instance ids too
    code = run_hsu("completion", "bash")
    assert code.returncode == 0 and "complete" in code.stdout and "hsu" in code.stdout


#: what `hsu ping` and `hsu status` must not import: the kernel's machinery,
#: the plugin system (pluggy, hsu.hookspecs, entry points through
#: importlib.metadata), the config stack, logging, and what only `hsu new`
#: (hsu._kernel.cli_new) or the metrics registry (hsu.metrics, attrs) need, and
#: what argparse and the socket lookup would import for nothing
FORBIDDEN = (
    "hsu._kernel.kernel",
    "hsu._kernel.plugins",
    "hsu._kernel.config",
    "hsu._kernel.supervision",
    "hsu._kernel.server",
    "hsu._kernel.core_service",
    "hsu._kernel.cli_new",
    "hsu.hookspecs",
    "hsu.metrics",
    "hsu.ports",
    "hsu.client.aio",
    "pluggy",
    "importlib.metadata",
    "attrs",
    "cattrs",
    "yaml",
    "psutil",
    "loguru",
    "argcomplete",
    "shutil",  # argparse's HelpFormatter imports it (and bz2, lzma): cli._Formatter does not
    "hashlib",  # control.default_socket's digest: not needed with --control
    # on a local unix socket the CLI's own HTTP/2 client makes the calls
    # (hsu._kernel.h2unary): importing grpcio, and asyncio with it, costs more
    # than the rest of the command (docs/benchmarks.md)
    "grpc",
    "asyncio",
)


@pytest.mark.parametrize("command", ["status", "ping"])
def test_ping_and_status_do_not_import_the_kernels_machinery(kernel, command):
    code = (
        "import sys\n"
        "from hsu._kernel import cli\n"
        f"rc = cli.main([{command!r}, '--control', {kernel.address!r}])\n"
        "print('MODULES', *sorted(sys.modules))\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=hsu_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    modules = out.stdout.split("MODULES", 1)[1].split()
    assert "hsu._kernel.h2unary" in modules  # it did talk to the kernel
    forbidden = (*FORBIDDEN, "google.protobuf") if command == "ping" else FORBIDDEN
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert loaded == []


#: what `hsu ping` and `hsu status` have not imported when their requests go
#: out (`hsu status` imports protobuf after, while the kernel answers): the
#: socket module's enums, pathlib and the control plane's address helpers
#: are not needed with --control (docs/benchmarks.md, "`hsu status` with
#: 1,000 running")
BEFORE_SEND = (
    "socket",
    "selectors",
    "pathlib",
    "threading",
    "ipaddress",
    "urllib",
    "hsu._kernel.control",
    "google.protobuf",
)


@pytest.mark.parametrize("command", ["status", "ping"])
def test_ping_and_status_send_before_importing_more(kernel, command):
    code = (
        "import sys\n"
        "from hsu._kernel import cli, h2unary\n"
        "send = h2unary.send\n"
        "def spy(*args, **kwargs):\n"
        "    print('MODULES', *sorted(sys.modules))\n"
        "    return send(*args, **kwargs)\n"
        "h2unary.send = spy\n"
        f"sys.exit(cli.main([{command!r}, '--control', {kernel.address!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=hsu_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("MODULES") == 1  # one send, all the calls in it
    modules = out.stdout.split("MODULES", 1)[1].split("\n", 1)[0].split()
    assert "hsu._kernel.h2unary" in modules
    early = [m for m in modules if any(m == f or m.startswith(f + ".") for f in BEFORE_SEND)]
    assert early == []


def test_pings_request_is_the_message_protobuf_would_write():
    from hsu._kernel.cli import PING_REQUEST
    from hsu.core.v1 import core_pb2

    assert core_pb2.PingRequest(payload=b"hsu").SerializeToString() == PING_REQUEST


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_parser_built_for_one_command_parses_it_as_the_whole_one():
    """main() makes only the arguments of the command being run; that
    command's parser (and its subcommands') is the one the full parser has."""
    full = build_parser()
    assert "new" in _subparsers(full) and "config" in _subparsers(full)
    for name, whole in _subparsers(full).items():
        only = build_parser(only=name)
        assert list(_subparsers(only)) == list(_subparsers(full))  # all listed
        part = _subparsers(only)[name]
        assert part.format_help() == whole.format_help(), name
        for sub_name, sub_whole in _subparsers(whole).items() if whole._subparsers else ():
            assert _subparsers(part)[sub_name].format_help() == sub_whole.format_help()
    argv = ["status", "--control", "unix:/k.sock", "--json", "--timeout", "2"]
    assert vars(build_parser(only="status").parse_args(argv)) == vars(full.parse_args(argv))


def test_help_documents_the_exit_codes_page():
    doc = (ROOT / "docs" / "cli.md").read_text()
    for name, code in EXIT.items():
        assert f"| {code} |" in doc, name
    out = run_hsu("--help")
    for command in ("run", "plugins", "status", "ping", "logs", "events", "completion"):
        assert command in out.stdout
        assert f"### `hsu {command}" in doc


def test_the_package_is_typed():
    assert (ROOT / "kernel" / "hsu" / "py.typed").is_file()
    assert Path(__import__("hsu").__file__).with_name("py.typed").is_file()
