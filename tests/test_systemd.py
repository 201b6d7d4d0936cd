"""The kernel under a service manager (docs/systemd.md) and as a container's
PID 1 (docs/containers.md): sd_notify messages received by a real datagram
socket, and orphans reaped in a real PID namespace."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import HSU, ROOT, hsu_env, wait_until, write_deployment
from hsu_plugins.systemd import notify_address, watchdog_interval

pytestmark = pytest.mark.integration

DEPLOYMENT = """\
name: notified
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    start: at-start
"""


def receive(sock: socket.socket, until: str, seconds: float = 30) -> list[str]:
    """Datagrams (bounded in time) up to and including the first that has ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(data)
        if until in data.splitlines():
            return got
    raise AssertionError(f"no {until} within {seconds}s; got {got}")


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_watchdog_and_stopping_reach_the_notify_socket_in_order(
    kernel_process, tmp_path: Path, kind: str
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = f"hsu-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    with sock:
        env = hsu_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
        k = kernel_process(write_deployment(tmp_path / "d.yaml", DEPLOYMENT), env)
        first = receive(sock, "READY=1")
        k.wait_ready()
        assert first[-1].splitlines()[1].startswith("STATUS=running notified on ")
        assert all("WATCHDOG=1" not in m for m in first)  # nothing before READY
        # half of 400 ms: several pings while it runs
        pings = receive(sock, "WATCHDOG=1")
        pings += receive(sock, "WATCHDOG=1")
        assert pings[-1] == "WATCHDOG=1"
        k.proc.send_signal(signal.SIGTERM)
        rest = receive(sock, "STOPPING=1")
        assert rest[-1].splitlines() == ["STOPPING=1", "STATUS=draining"]
        assert k.proc.wait(30) == 0
        sock.settimeout(0.5)
        after = []
        try:
            while True:
                after.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert all(m == "WATCHDOG=1" for m in after)  # the drain's pings, nothing else
        assert "READY=1" not in "\n".join(after)


def test_the_environment_is_read_as_sd_notify_reads_it() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/x.sock"}) == "/run/x.sock"
    assert notify_address({"NOTIFY_SOCKET": "@abs"}) == b"\0abs"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}, 7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, 7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None


# -- PID 1 --------------------------------------------------------------------------

ORPHANS = """\
import runpy, subprocess, sys
wait = sys.argv[1]  # a shell loop that ends once the test makes its file
# an orphan in the instance's own session: its parent exits at once
subprocess.run(["sh", "-c", f"sh -c '{wait}' & exit 0"], check=True)
# an orphan that made a session of its own
subprocess.run(["sh", "-c", f"setsid sh -c '{wait}' & exit 0"], check=True)
sys.argv[1:] = []
runpy.run_module("hsu_echo", run_name="__main__")
"""


def _unshare_ok() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.mark.skipif(
    not _unshare_ok() and not os.environ.get("HSU_REQUIRE_NETNS"),
    reason="needs root and unshare (util-linux)",
)
def test_as_pid_1_the_kernel_reaps_every_orphan(tmp_path: Path) -> None:
    script = tmp_path / "orphans.py"
    script.write_text(ORPHANS)
    stop = tmp_path / "stop"
    wait = f"while [ ! -e {stop} ]; do sleep 0.05; done"
    d = write_deployment(
        tmp_path / "d.yaml",
        "name: init\nunits:\n  echo:\n"
        f"    command: [python, {str(script)!r}, {wait!r}]\n"
        "    interfaces: [hsu.echo.v1.Echo]\n    start: at-start\n",
    )
    control = f"unix:{tmp_path / 'k.sock'}"
    err = (tmp_path / "kernel.err").open("w")
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *HSU, "run", str(d),
         "--control", control, "--address", f"unix:{tmp_path / 'data.sock'}"],
        env=hsu_env(),
        stdout=err,
        stderr=err,
        cwd=ROOT,
    )  # fmt: skip
    try:
        wait_until(lambda: bool(psutil.Process(outer.pid).children()), 30)
        [init] = psutil.Process(outer.pid).children()
        with open(f"/proc/{init.pid}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1"  # `hsu run` is PID 1 of its namespace
        wait_until(lambda: bool(init.children()), 30)
        [kernel] = init.children()  # the kernel, its one child
        # from outside its tree (as `docker exec` would): an orphan of a
        # process that entered the namespace
        subprocess.run(
            ["nsenter", "--target", str(kernel.pid), "--pid", "--mount",
             "sh", "-c", f"sh -c '{wait}' & exit 0"],
            check=True, timeout=30,
        )  # fmt: skip

        def adopted() -> list[psutil.Process]:
            return [c for c in _children(init, kernel) if _is(c, ["sh", "-c", wait])]

        wait_until(lambda: len(adopted()) == 3, 30)
        sleepers = adopted()
        # the instance's orphans go to the kernel (a subreaper), the outsider's to init
        assert sorted(s.ppid() == kernel.pid for s in sleepers) == [False, True, True]
        stop.touch()

        def reaped() -> bool:
            gone = [s for s in sleepers if not _exists(s.pid)]
            zombies = [c for c in _children(init, kernel) if _is(c, zombie=True)]
            return len(gone) == len(sleepers) and not zombies

        wait_until(reaped, 30)
        init.send_signal(signal.SIGTERM)  # forwarded to the kernel, which drains
        assert outer.wait(30) == 0
    finally:
        stop.touch()
        if outer.poll() is None:
            outer.kill()  # --kill-child: the namespace goes with it
            outer.wait(30)
        err.close()
    log = (tmp_path / "kernel.err").read_text()
    assert "Traceback" not in log, log


def _exists(pid: int) -> bool:
    """Whether ``pid`` is still a process, a zombie included (not yet reaped)."""
    return Path(f"/proc/{pid}").exists()


def _children(*parents: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in parents:
        with contextlib.suppress(psutil.NoSuchProcess):
            out.extend(p.children())
    return out


def _is(p: psutil.Process, cmdline: list[str] | None = None, *, zombie: bool = False) -> bool:
    """A child that is (not) a zombie and runs ``cmdline``; False once it is gone."""
    try:
        if (p.status() == psutil.STATUS_ZOMBIE) != zombie:
            return False
        return cmdline is None or p.cmdline() == cmdline
    except psutil.NoSuchProcess:
        return False
