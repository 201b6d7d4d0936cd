"""Containment and file modes: what an HSU starts ends with it (cgroups or the
child subreaper), no zombie is left (even as PID 1), and the state dir, the
state file and the logs are private whatever the umask, and a state file this
user did not write is never acted on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from loguru import logger

import hsu
from conftest import HSU, ROOT, hsu_env, until, wait_until, write_deployment
from hsu._kernel.supervision import statefile
from hsu._kernel.supervision.containment import cgroup_of, find_cgroup
from hsu.testing import build_kernel

S = hsu.InstanceState
#: a writable cgroup v2 here (else the kernel must report the fallback)
CGROUPS = find_cgroup()[0] is not None
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

#: an HSU whose child leaves the group (setsid) and forks the daemon that
#: stays; the daemon writes its pid to argv[1]
ESCAPE = r"""
import os, sys, time
out = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(out + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(out + ".tmp", out)
        time.sleep(600)
    os._exit(0)
os.wait()
time.sleep(600)
"""

#: an HSU whose children each leave a grandchild that exits at once (a zombie
#: of whoever adopts it), half of them after a setsid; then it writes argv[1]
ZOMBIES = r"""
import os, sys, time

def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False

for i in range(4):
    child = os.fork()
    if child == 0:
        if i % 2:
            os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            os._exit(0)
        while not zombie(grandchild):
            time.sleep(0.001)
        os._exit(0)  # the zombie goes to the reaper: the kernel
    os.waitpid(child, 0)
with open(sys.argv[1], "w") as f:
    f.write("done")
time.sleep(600)
"""


def managed(command: list[str], **more: object) -> dict[str, object]:
    return {"command": command, "kind": "managed", "stop_grace": 2, "start": "at-start", **more}


def gone(pid: int) -> bool:
    """No such process: exited and reaped (a zombie still counts)."""
    return not psutil.pid_exists(pid)


@contextlib.contextmanager
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        yield seen
    finally:
        logger.remove(sink)


@contextlib.contextmanager
def infos() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="INFO")
    try:
        yield seen
    finally:
        logger.remove(sink)


async def escaped_daemon(kernel, pidfile: Path) -> int:
    """The daemon's pid once it runs, checked to be outside its HSU's group."""
    await until(pidfile.exists)
    daemon = int(pidfile.read_text())  # noqa: ASYNC240
    [inst] = kernel.instances.values()
    assert os.getpgid(daemon) != inst.pid and os.getsid(daemon) != inst.pid
    return daemon


# -- the setsid escape ---------------------------------------------------------------


@pytest.mark.parametrize("reattach", [True, False], ids=["reattach", "no-reattach"])
@pytest.mark.parametrize("mode", ["auto", "subreaper"])
async def test_a_setsid_double_fork_ends_with_a_clean_kernel_stop(
    hsu_kernel_factory, tmp_path, monkeypatch, mode, reattach
):
    monkeypatch.setenv("HSU_CONTAINMENT", mode)
    script = tmp_path / "escape.py"
    script.write_text(ESCAPE)
    pidfile = tmp_path / "daemon.pid"
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"reattach": reattach},
            "units": {"d": managed(["python", str(script), str(pidfile)])},
        }
    )
    expected = "cgroup" if CGROUPS and mode == "auto" else "subreaper"
    assert kernel.containment.mode == expected
    daemon = await escaped_daemon(kernel, pidfile)
    [inst] = kernel.instances.values()
    if expected == "cgroup":
        base = kernel.containment.base
        assert base is not None and base.name.startswith(f"hsu-{os.getpid()}-")
        assert (cgroup_of(daemon) or "").endswith(f"/{base.name}/{inst.instance_id}")
    with warnings() as seen:
        await kernel.stop()
    # killed, and reaped by the kernel (the test process is its subreaper)
    await until(lambda: gone(daemon), 10)
    assert any(f"left outside its process group: {daemon}" in m for m in seen), seen


@pytest.mark.parametrize("mode", ["auto", "subreaper"])
async def test_what_a_dead_hsu_left_ends_before_its_replacement_starts(
    hsu_kernel_factory, tmp_path, monkeypatch, mode
):
    monkeypatch.setenv("HSU_CONTAINMENT", mode)
    script = tmp_path / "escape.py"
    script.write_text(ESCAPE)
    pidfile = tmp_path / "daemon.pid"
    kernel = await hsu_kernel_factory(
        {"units": {"d": managed(["python", str(script), str(pidfile)])}}
    )
    daemon = await escaped_daemon(kernel, pidfile)
    [inst] = kernel.instances.values()
    first = inst.pid
    pidfile.unlink()
    os.kill(first, signal.SIGKILL)
    await until(lambda: gone(daemon), 10)
    # the replacement's own daemon runs, and a unit stop ends it too
    await until(lambda: inst.state is S.READY and inst.pid not in (0, first))
    second = await escaped_daemon(kernel, pidfile)
    await kernel.stop_unit("d")
    await until(lambda: gone(second), 10)
    assert inst.state is S.STOPPED


async def test_each_instance_has_its_own_cgroup_or_the_fallback_is_reported(
    hsu_kernel_factory, tmp_path
):
    script = tmp_path / "escape.py"
    script.write_text(ESCAPE)
    pidfile = tmp_path / "daemon.pid"
    with infos() as said:
        kernel = await hsu_kernel_factory(
            {"units": {"d": managed(["python", str(script), str(pidfile)])}}
        )
    if not CGROUPS:
        # this machine gives no writable cgroup v2: the kernel says what it uses
        assert kernel.containment.mode == "subreaper"
        assert any(m.startswith("containment: no cgroups (") for m in said), said
        return
    assert kernel.containment.mode == "cgroup"
    base = kernel.containment.base
    assert base is not None
    assert any(m == f"containment: a cgroup v2 per instance under {base}" for m in said), said
    daemon = await escaped_daemon(kernel, pidfile)
    [inst] = kernel.instances.values()
    leaf = base / inst.instance_id
    procs = {int(p) for p in (leaf / "cgroup.procs").read_text().split()}
    assert {inst.pid, daemon} <= procs
    assert kernel.containment.members(inst.instance_id) is not None
    await kernel.stop_unit("d")
    assert not leaf.exists()
    await until(lambda: gone(daemon), 10)


# -- PID 1 -------------------------------------------------------------------------


def _zombie_children(pid: int) -> list[int]:
    found = []
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["ppid"] == pid and p.info["status"] == psutil.STATUS_ZOMBIE:
            found.append(p.pid)
    return found


def test_as_pid_1_of_a_pid_namespace_the_kernel_reaps_every_orphan(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("util-linux's unshare is not installed")
    script = tmp_path / "zombies.py"
    script.write_text(ZOMBIES)
    done = tmp_path / "done"
    deployment = write_deployment(
        tmp_path / "d.yaml",
        f"name: pid1\nunits:\n  z:\n    command: [python, {script}, {done}]\n"
        "    kind: managed\n    start: at-start\n    stop_grace: 2\n",
    )
    log = tmp_path / "kernel.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                *HSU, "run", str(deployment),
                "--control", f"unix:{tmp_path / 'k.sock'}",
                "--address", f"unix:{tmp_path / 'd.sock'}",
            ],
            env=hsu_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )  # fmt: skip
    try:
        wait_until(lambda: done.exists() or proc.poll() is not None, 30)
        assert proc.poll() is None, log.read_text()
        [kernel] = psutil.Process(proc.pid).children()
        # the kernel is PID 1 of its namespace: every orphan there is its child
        nspids = next(
            line.split()[1:]
            for line in Path(f"/proc/{kernel.pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        )
        assert nspids[-1] == "1"
        # four grandchildren were zombies when they were re-parented to it
        wait_until(lambda: not _zombie_children(kernel.pid), 10)
        time.sleep(0.2)
        assert not _zombie_children(kernel.pid)
        kernel.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child: the namespace dies with it
            proc.wait(10)
    assert "containment: " in log.read_text()


# -- file modes --------------------------------------------------------------------


def test_under_umask_000_the_state_dir_state_file_and_logs_are_private(tmp_path):
    deployment = write_deployment(
        tmp_path / "d.yaml",
        "name: umask\nunits:\n  p:\n"
        "    command: [python, -u, -c, \"import time; print('hi', flush=True); time.sleep(600)\"]\n"
        "    kind: managed\n    start: at-start\n    stop_grace: 2\n",
    )
    state = tmp_path / ".hsu" / "umask"
    log = tmp_path / "kernel.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                *HSU, "run", str(deployment),
                "--control", f"unix:{tmp_path / 'k.sock'}",
                "--address", f"unix:{tmp_path / 'd.sock'}",
            ],
            env=hsu_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            umask=0,
        )  # fmt: skip
    try:
        logs = state / "logs" / "p"
        wait_until(
            lambda: (
                proc.poll() is not None
                or ((state / "storage.sqlite3").exists() and any(logs.glob("*.stdout.log")))
            ),
            30,
        )
        assert proc.poll() is None, log.read_text()
        wait_until(lambda: "hi" in next(logs.glob("*.stdout.log")).read_text())
        modes = {
            str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
            for p in [state, *state.glob("storage.sqlite3*"), state / "logs", logs, *logs.iterdir()]
        }
        expected = {name: 0o700 if (tmp_path / name).is_dir() else 0o600 for name in modes}
        assert modes == expected
        # the two log files, and the storage with its WAL and shared memory
        assert len(modes) == 8, modes
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# -- the state file ----------------------------------------------------------------


def test_create_time_is_psutils_and_none_for_a_zombie_or_a_gone_pid():
    """The state file's start time of a pid, read from /proc/<pid>/stat, is
    psutil's (a state file written by either is read by the other)."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        assert statefile.create_time(proc.pid) == psutil.Process(proc.pid).create_time()
        assert statefile.create_time(os.getpid()) == psutil.Process().create_time()
        proc.kill()
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        assert statefile.create_time(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()
    assert statefile.create_time(proc.pid) is None  # reaped (and above pid_max:)
    assert statefile.create_time(2**22 + 1) is None


def plant(path: Path, sleeper: int, unit: str) -> str:
    """A state file naming ``sleeper`` as an instance of ``unit``, left by a
    kernel that is gone."""
    created = statefile.create_time(sleeper)
    assert created is not None
    return json.dumps(
        {
            "kernel_pid": 2**22 + 1,  # above pid_max: no such process
            "kernel_create_time": 0.0,
            "deployment": "planted",
            "instances": [
                {"instance_id": f"{unit}-0000", "unit": unit, "pid": sleeper,
                 "create_time": created},
            ],
        }
    )  # fmt: skip


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another local user (65534) can reach, as a deployment's
    directory may be."""
    path = Path(tempfile.mkdtemp(prefix="hsu-shared-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("how", ["another user wrote it", "mode 0666", "trusted (control)"])
async def test_a_state_file_this_user_did_not_write_is_never_acted_on(shared_dir, how):
    # its own group, as an HSU's: the kernel stops an orphan by its group
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # noqa: ASYNC220
    try:
        kernel = build_kernel({"name": "planted", "units": {}}, base_dir=str(shared_dir))
        assert kernel.state_path is not None
        state = kernel.state_path.parent
        state.mkdir(parents=True)
        text = plant(kernel.state_path, sleeper.pid, "gone")
        if how == "another user wrote it":
            # a state dir left world-writable (an old kernel under umask 000):
            # another local user puts a state file in it
            state.chmod(0o777)
            shared_dir.joinpath(".hsu").chmod(0o755)
            write = 'umask 077; printf %s "$1" > "$2"'
            subprocess.run(  # noqa: ASYNC221
                [*NOBODY, "sh", "-c", write, "sh", text, str(kernel.state_path)], check=True
            )
            assert kernel.state_path.stat().st_uid == 65534
        else:
            kernel.state_path.write_text(text)
            kernel.state_path.chmod(0o666 if how == "mode 0666" else 0o600)
        with warnings() as seen:
            await kernel.start()
            await kernel.stop()
        if how == "trusted (control)":
            # the same file written by this user: its orphan is stopped
            assert sleeper.wait(10) == -signal.SIGTERM
            assert any("its unit is gone" in m for m in seen), seen
            return
        assert sleeper.poll() is None  # never signalled
        why = "owned by uid 65534" if how == "another user wrote it" else "mode 0666"
        assert any(
            m.startswith(f"ignoring the state file {kernel.state_path}: {why}") for m in seen
        ), seen
        assert stat.S_IMODE(state.stat().st_mode) == 0o700  # and the dir is private again
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_a_recorded_pid_whose_start_time_differs_is_not_signalled(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # noqa: ASYNC220
    try:
        kernel = build_kernel(
            {"name": "reused", "units": {"u": managed(["sleep", "60"], start="on-demand")}},
            base_dir=str(tmp_path),
        )
        assert kernel.state_path is not None
        kernel.state_path.parent.mkdir(parents=True)
        raw = json.loads(plant(kernel.state_path, sleeper.pid, "u"))
        raw["instances"][0]["create_time"] -= 5  # the pid was reused since
        kernel.state_path.write_text(json.dumps(raw))
        kernel.state_path.chmod(0o600)
        with infos() as said:
            await kernel.start()
            await kernel.stop()
        assert sleeper.poll() is None
        assert any(f"(pid {sleeper.pid}) is gone since the last kernel" in m for m in said)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_state_file_is_written_0600_atomically_whatever_the_umask(tmp_path):
    path = tmp_path / "s" / "state.json"
    old = os.umask(0)
    try:
        statefile.save(path, statefile.SavedState(os.getpid(), 0.0, "x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left
    assert statefile.load(path) == statefile.SavedState(os.getpid(), 0.0, "x")
    # a symlink in its place is not followed
    path.unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    path.symlink_to(target)
    with warnings() as seen:
        assert statefile.load(path) is None
    assert seen == [f"ignoring the state file {path}: a symlink; re-attaching to or stopping"
                    " nothing in it"]  # fmt: skip


BURST = """
import asyncio, os, signal
from hsu._kernel.supervision.containment import Containment

async def main():
    c = Containment(lambda: [])
    c.start()
    try:
        for _ in range(3000):  # a burst of exits while the loop is busy
            os.kill(os.getpid(), signal.SIGCHLD)
        await asyncio.sleep(0.1)
        print("reaping on SIGCHLD:", c._sigchld)
    finally:
        c.close()

asyncio.run(main())
"""


def test_a_burst_of_sigchld_prints_nothing_on_the_kernels_stderr():
    # 1,000 instances stopped at once: SIGCHLD comes faster than the busy
    # loop reads its wake-up pipe; Python used to print a BlockingIOError
    # line for every signal past a full pipe (thousands on the kernel's stderr)
    out = subprocess.run(
        [sys.executable, "-c", BURST], capture_output=True, text=True, env=hsu_env(), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "reaping on SIGCHLD: True" in out.stdout  # the path under test was taken
    assert "wakeup fd" not in out.stderr
