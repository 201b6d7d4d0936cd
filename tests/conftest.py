"""Shared fixtures: leak detection, installed test plugin distributions, CLI runs."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTS = Path(__file__).resolve().parent / "dists"
HSU = [sys.executable, "-m", "hsu"]
PR_SET_CHILD_SUBREAPER = 36
#: the runtime dir this pytest session made (removed at its end)
RUNTIME_DIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of the processes a test starts (an HSU whose kernel was killed)
    # are re-parented to pytest rather than init, so the leak check sees them.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # kernels name their control address in a runtime dir of the session's,
    # not the user's (hsu._kernel.control)
    # (an xdist worker makes its own: "the sole running kernel" is per worker)
    if not os.environ.get("HSU_RUNTIME_DIR") or os.environ.get("PYTEST_XDIST_WORKER"):
        import tempfile

        os.environ["HSU_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="hsu-run-")
        config.stash[RUNTIME_DIR] = os.environ["HSU_RUNTIME_DIR"]


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    # only the one this session made (a pytest run inside a test inherits it)
    run = config.stash.get(RUNTIME_DIR, None)
    if run is not None:
        shutil.rmtree(run, ignore_errors=True)


def _live_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, os.WNOHANG)
                continue
            alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves any process it started running (and end those)."""
    before = {p.pid for p in _live_children()}
    yield
    deadline = time.monotonic() + 5.0
    leaked = [p for p in _live_children() if p.pid not in before]
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [p for p in _live_children() if p.pid not in before]
    if leaked:
        described = []
        for p in leaked:
            with contextlib.suppress(psutil.NoSuchProcess):
                described.append(f"{p.pid} {' '.join(p.cmdline())}")
                p.kill()
        psutil.wait_procs(leaked, timeout=5)
        _live_children()
        pytest.fail(f"test left processes running: {described}")


@pytest.fixture(scope="session")
def plugin_dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin distributions, pip-installed from their directories into
    a folder that tests put on sys.path / PYTHONPATH: real dist-info, real
    entry points, and nothing leaks into the environment running the tests."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
            *(str(d) for d in sorted(DISTS.iterdir()) if d.is_dir()),
        ],
        check=True,
    )  # fmt: skip
    return target


def hsu_env(extra_path: Path | None = None, **env: str) -> dict[str, str]:
    """The environment for an `hsu` subprocess: autoload off unless asked."""
    out = {
        k: v for k, v in os.environ.items() if not k.startswith("HSU_") or k == "HSU_RUNTIME_DIR"
    }
    out["HSU_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    if extra_path is not None:
        out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), out.get("PYTHONPATH")]))
    out.update(env)
    return out


def run_hsu(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HSU, *args],
        capture_output=True,
        text=True,
        env=env or hsu_env(),
        timeout=timeout,
        cwd=ROOT,
    )


class KernelProcess:
    """`hsu run` as a subprocess on a unix socket, stopped by pid at the end."""

    def __init__(self, deployment: Path, address: str, env: dict[str, str], *args: str, logs: Path):
        #: the control plane (Kernel API, Core): what the CLI calls
        self.address = address
        #: the data plane (the gateway)
        self.data = address.replace(".sock", ".data.sock")
        # output to files, not pipes: a kernel that logs a lot never blocks on
        # a test that is not reading yet
        self.out = logs / f"kernel.{id(self)}.out"
        self.err = logs / f"kernel.{id(self)}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [*HSU, "run", str(deployment), "--control", address, "--address", self.data, *args],
                env=env,
                stdout=out,
                stderr=err,
                text=True,
                cwd=ROOT,
            )

    def output(self) -> tuple[str, str]:
        return self.out.read_text(), self.err.read_text()

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until the kernel reports health SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    out, err = self.output()
                    raise AssertionError(f"kernel exited {self.proc.returncode}:\n{out}\n{err}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise AssertionError("kernel did not become SERVING in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, *self.output()


@pytest.fixture
def kernel_process(tmp_path: Path) -> Iterator[type[KernelProcess]]:
    started: list[KernelProcess] = []

    class Tracked(KernelProcess):
        def __init__(self, deployment: Path, env: dict[str, str] | None = None, *args: str):
            super().__init__(
                deployment, f"unix:{tmp_path / 'k.sock'}", env or hsu_env(), *args, logs=tmp_path
            )
            started.append(self)

    yield Tracked
    for k in started:
        if k.proc.poll() is None:
            # a drain stops its instances; SIGKILL would leave them to outlive it
            k.proc.terminate()
            try:
                k.proc.wait(30)
            except subprocess.TimeoutExpired:
                k.proc.kill()
                k.proc.wait()


def write_deployment(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Wait (bounded) for a condition a kernel subprocess reaches on its own."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Wait (bounded) for a condition an in-process kernel reaches on its own."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")
