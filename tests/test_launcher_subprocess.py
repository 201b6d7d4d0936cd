"""The subprocess launcher against real processes: never a fork() next to gRPC
threads, exec wrappers that keep the HSU's pid, and the errors of a bad command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import grpc
import psutil
import pytest

from hsu._kernel.supervision.containment import find_cgroup
from hsu.errors import LaunchError
from hsu.ports import LaunchSpec
from hsu.process import UNKNOWN_STATUS, PidfdHandle
from hsu_plugins.launch.subprocess import SubprocessLauncher, _argv

pytestmark = pytest.mark.integration

LAUNCHER = SubprocessLauncher()
#: what puts a wrapper in front of the command: none, each, both
WRAPPED: dict[str, dict[str, Any]] = {
    "plain": {},
    "rlimits": {"rlimits": {"nofile": 256}},
    "die_with_kernel": {"die_with_kernel": True},
    "both": {"rlimits": {"nofile": 256, "core": 0}, "die_with_kernel": True},
}

#: where exec finds ``sleep`` on this PATH
SLEEP = shutil.which("sleep") or "sleep"
SLEEP_REAL = os.path.realpath(SLEEP)


def spec(argv: list[str], env: Mapping[str, str] | None = None, **more: Any) -> LaunchSpec:
    return LaunchSpec("t", "t-1", argv, dict(os.environ) if env is None else env, **more)


async def run(launch: LaunchSpec) -> int:
    handle = await LAUNCHER.launch(launch)
    async with asyncio.timeout(30):
        return await handle.wait()


async def until_running(handle: PidfdHandle, real: str) -> psutil.Process:
    """The launched process once it runs ``real`` (the wrappers have exec'd it)."""
    link = f"/proc/{handle.pid}/exe"
    deadline = time.monotonic() + 10
    while (now := os.readlink(link)) != real:  # psutil would cache the first answer
        assert time.monotonic() < deadline, f"pid {handle.pid} still runs {now}"
        await asyncio.sleep(0.005)
    return psutil.Process(handle.pid)


# -- no fork next to gRPC threads ----------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


@contextlib.asynccontextmanager
async def grpc_under_load(clients: int = 4) -> AsyncIterator[list[int]]:
    """A grpc aio server in this process, kept busy by ``clients`` concurrent
    callers over loopback while the body runs; yields the running call count."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_echo)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    calls = [0]
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/t.Echo/Call")

        async def load() -> None:
            while not stop.is_set():
                await call(b"x" * 64, timeout=10)
                calls[0] += 1

        tasks = [asyncio.create_task(load()) for _ in range(clients)]
        try:
            await asyncio.sleep(0.05)
            yield calls
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    await server.stop(None)


async def test_wrapped_launches_next_to_busy_grpc_threads_all_exit_cleanly() -> None:
    # A preexec_fn makes Popen fork() instead of vfork(), and grpcio's fork
    # handlers then crash the child while gRPC threads are busy: with one, about
    # 1 launch in 5 here died of SIGSEGV or SIGABRT instead of exiting 0.
    codes = []
    async with asyncio.timeout(60), grpc_under_load() as calls:
        before = calls[0]
        for i in range(60):
            launch = spec(["true"], rlimits={"nofile": 256, "core": 0}, die_with_kernel=True)
            handle = await LAUNCHER.launch(attrs.evolve(launch, instance_id=f"t-{i}"))
            codes.append(await handle.wait())
            await asyncio.sleep(0.001)
        assert calls[0] > before  # the server was busy meanwhile
    assert codes == [0] * 60, f"exit statuses (negative: killed by that signal): {Counter(codes)}"


# -- the wrappers exec the command: its pid, group and session -----------------


async def test_a_wrapped_command_keeps_its_pid_group_and_session_and_can_be_reattached() -> None:
    launch = spec(["sleep", "60"], rlimits={"nofile": 256}, die_with_kernel=True)
    handle = await LAUNCHER.launch(launch)
    try:
        created = psutil.Process(handle.pid).create_time()
        proc = await until_running(handle, SLEEP_REAL)
        assert proc.cmdline() == [SLEEP, "60"]  # the path exec was given
        assert proc.ppid() == os.getpid()  # no wrapper left in between
        assert os.getpgid(proc.pid) == os.getsid(proc.pid) == proc.pid
        assert proc.create_time() == created  # what re-attach checks the pid by
        attached = LAUNCHER.attach(proc.pid)
        attached.signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await handle.wait() == -signal.SIGTERM
            assert await attached.wait() == UNKNOWN_STATUS
    finally:
        handle.signal(signal.SIGKILL)
        await handle.wait()


PDEATHSIG = (
    "import ctypes; v = ctypes.c_int(); "
    "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"  # PR_GET_PDEATHSIG
)


@pytest.mark.parametrize("wrapped", list(WRAPPED))
async def test_die_with_kernel_arms_sigkill_on_the_parents_death(
    wrapped: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with out.open("wb") as f:
        code = await run(
            spec([sys.executable, "-c", PDEATHSIG], stdout=f.fileno(), **WRAPPED[wrapped])
        )
    assert code == 0
    armed = WRAPPED[wrapped].get("die_with_kernel", False)
    assert out.read_text().strip() == str(int(signal.SIGKILL) if armed else 0)


# -- a cgroup, joined before the command runs --------------------------------------


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """An empty cgroup v2 of its own under this process's (skipped without one),
    emptied and removed at the end."""
    home, why = find_cgroup()
    if home is None:
        pytest.skip(f"no writable cgroup v2 here: {why}")
    path = home.directory / f"hsu-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 10
        while (path / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            (path / "cgroup.kill").write_text("1")
            time.sleep(0.01)
        path.rmdir()


async def test_a_command_is_in_its_cgroup_from_its_first_instruction(
    cgroup: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with out.open("wb") as f:
        launch = spec(["cat", "/proc/self/cgroup"], stdout=f.fileno(), cgroup=str(cgroup))
        assert await run(launch) == 0
    home, _ = find_cgroup()
    assert home is not None
    assert f"0::{home.path.rstrip('/')}/{cgroup.name}" in out.read_text().splitlines()


async def test_with_a_cgroup_and_every_wrapper_the_command_keeps_its_pid(cgroup: Path) -> None:
    launch = spec(
        ["sleep", "60"], cgroup=str(cgroup), rlimits={"nofile": 256}, die_with_kernel=True
    )
    handle = await LAUNCHER.launch(launch)
    try:
        proc = await until_running(handle, SLEEP_REAL)
        assert proc.ppid() == os.getpid()  # no wrapper left in between
        assert (cgroup / "cgroup.procs").read_text().split() == [str(handle.pid)]
    finally:
        handle.signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await handle.wait()


async def test_the_cgroups_shell_gives_back_the_soft_open_files_limit_without_prlimit(
    cgroup: Path,
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    launch = spec(["sleep", "60"], cgroup=str(cgroup), nofile_soft=200, die_with_kernel=True)
    assert "prlimit" not in " ".join(_argv("t", launch, launch.env))  # one exec less
    handle = await LAUNCHER.launch(launch)
    try:
        proc = await until_running(handle, SLEEP_REAL)
        assert proc.ppid() == os.getpid()
        assert proc.rlimit(psutil.RLIMIT_NOFILE) == (200, hard)  # the hard one untouched
        assert (cgroup / "cgroup.procs").read_text().split() == [str(handle.pid)]
    finally:
        handle.signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await handle.wait()
    # with other rlimits prlimit runs anyway, and sets the soft limit too
    both = spec(["true"], cgroup=str(cgroup), nofile_soft=200, rlimits={"core": 0})
    argv = _argv("t", both, both.env)
    assert "--nofile=200:" in argv and "200" not in argv[: argv.index("--core=0:0")]


async def test_a_soft_limit_the_shell_cannot_set_never_runs_the_command(
    cgroup: Path, tmp_path: Path
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit to go over")
    err, ran = tmp_path / "err", tmp_path / "ran"
    with err.open("wb") as f:
        launch = spec(
            ["touch", str(ran)], stderr=f.fileno(), cgroup=str(cgroup), nofile_soft=hard + 1
        )
        assert await run(launch) == 126
    assert not ran.exists()
    assert err.read_text() == f"hsu: cannot set the soft limit of open files to {hard + 1}\n"


async def test_a_cgroup_that_cannot_be_joined_never_runs_the_command(tmp_path: Path) -> None:
    err, ran = tmp_path / "err", tmp_path / "ran"
    with err.open("wb") as f:
        launch = spec(
            ["touch", str(ran)], stderr=f.fileno(), cgroup=str(tmp_path / "no-such-cgroup")
        )
        assert await run(launch) == 126
    assert not ran.exists()
    procs = tmp_path / "no-such-cgroup" / "cgroup.procs"
    assert err.read_text() == f"hsu: cannot join the cgroup of {procs}\n"


# -- a bad command reads the same with or without a wrapper --------------------


@pytest.mark.parametrize("wrapped", list(WRAPPED))
async def test_a_missing_executable_names_it_and_the_command(wrapped: str) -> None:
    for argv in (["no-such-program-hsu", "--flag"], ["/nonexistent/hsu-ghost"]):
        with pytest.raises(LaunchError) as info:
            await LAUNCHER.launch(spec(argv, **WRAPPED[wrapped]))
        assert str(info.value) == (
            f"unit 't': executable {argv[0]!r} not found (command: {' '.join(argv)})"
        )


@pytest.mark.parametrize("wrapped", list(WRAPPED))
async def test_a_file_or_directory_that_is_not_executable_says_so(
    wrapped: str, tmp_path: Path
) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "dir").mkdir()
    cases = [
        ([str(tmp_path / "script")], None, None),
        (["./script"], None, str(tmp_path)),
        ([str(tmp_path / "dir")], None, None),
        (["script"], {"PATH": str(tmp_path)}, None),
    ]
    for argv, env, cwd in cases:
        with pytest.raises(LaunchError) as info:
            await LAUNCHER.launch(spec(argv, env, cwd=cwd, **WRAPPED[wrapped]))
        assert str(info.value) == f"unit 't': {argv[0]!r} is not executable"


@pytest.mark.parametrize("wrapped", list(WRAPPED))
async def test_the_command_is_found_as_exec_finds_it(wrapped: str, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "hsu-tool"
    tool.write_text("#!/bin/sh\nexit 7\n")
    tool.chmod(0o755)
    (tmp_path / "hsu-tool").write_text("#!/bin/sh\nexit 8\n")  # not on PATH: not run
    more = WRAPPED[wrapped]
    # relative to the unit's cwd, not the kernel's
    assert await run(spec(["./bin/hsu-tool"], cwd=str(tmp_path), **more)) == 7
    assert await run(spec(["bin/hsu-tool"], cwd=str(tmp_path), **more)) == 7
    # a bare name on the PATH of the child's environment (relative entries: from its cwd)
    assert await run(spec(["hsu-tool"], {"PATH": str(bin_dir)}, **more)) == 7
    assert (
        await run(spec(["hsu-tool"], {"PATH": "/nonexistent:bin"}, cwd=str(tmp_path), **more)) == 7
    )
    with pytest.raises(LaunchError, match="not found"):
        await LAUNCHER.launch(spec(["hsu-tool"], **more))  # nor on another environment's PATH


async def test_a_missing_wrapper_names_the_tool_and_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(os.environ)
    monkeypatch.setenv("PATH", str(tmp_path))  # the kernel's: where wrappers are looked for
    with pytest.raises(LaunchError) as info:
        await LAUNCHER.launch(spec(["true"], env, rlimits={"nofile": 256}))
    assert str(info.value) == (
        "unit 't': cannot set rlimits: 'prlimit' (package util-linux)"
        " not found on the kernel's PATH"
    )
    with pytest.raises(LaunchError) as info:
        await LAUNCHER.launch(spec(["true"], env, die_with_kernel=True))
    assert str(info.value) == (
        "unit 't': cannot set die_with_kernel: 'setpriv' (package util-linux)"
        " not found on the kernel's PATH"
    )
    # nothing to wrap: nothing needed
    assert await run(spec(["true"], env)) == 0


async def test_a_bad_rlimit_is_a_launch_error() -> None:
    with pytest.raises(LaunchError, match=r"^unit 't': rlimits.nofle: cannot set 1$"):
        await LAUNCHER.launch(spec(["true"], rlimits={"nofle": 1}))


# -- the handle's exit -------------------------------------------------------------


async def test_every_exited_future_gets_the_status_and_cancelling_one_spares_the_rest() -> None:
    handle = await LAUNCHER.launch(spec([SLEEP, "30"]))
    first, second, third = handle.exited(), handle.exited(), handle.exited()
    second.cancel()  # what a supervisor does when it stops waiting
    handle.signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await first == -signal.SIGTERM
        assert await third == -signal.SIGTERM
        assert await handle.wait() == -signal.SIGTERM
    assert second.cancelled()
    late = handle.exited()  # asked for after the exit: done at once
    assert late.done() and late.result() == -signal.SIGTERM
    assert handle.returncode == -signal.SIGTERM
