"""A local etcd cluster for tests and benchmarks: N members of Debian's
``etcd`` (3.4) on loopback ports, their data in one directory (0700), each
started and stopped by its pid.

Not used by the plugin itself; the tests' fixture and ``bench/etcd.py`` use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: the executable; $HSU_ETCD overrides the PATH lookup
ETCD = "etcd"


def etcd_executable() -> str | None:
    """Where the etcd server is, or None."""
    return os.environ.get("HSU_ETCD") or shutil.which(ETCD) or _debian()


def _debian() -> str | None:
    return "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """A member exited because one of its ports was in use."""


class Member:
    """One etcd process."""

    def __init__(self, name: str, host: str, client_port: int, peer_port: int) -> None:
        self.name = name
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    """``size`` etcd members on ``host`` (loopback), data under ``base``.

    :param netns: per member, a network namespace to run it in (``ip netns
        exec``); ``None``: the caller's.
    """

    def __init__(
        self,
        base: Path,
        size: int = 3,
        *,
        hosts: list[str] | None = None,
        netns: list[str | None] | None = None,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
    ) -> None:
        exe = etcd_executable()
        if exe is None:
            raise FileNotFoundError("etcd: no etcd executable on PATH or at /usr/bin/etcd")
        self.exe = exe
        self.base = base
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(base, 0o700)
        hosts = hosts or ["127.0.0.1"] * size
        self.netns = netns or [None] * size
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.members = [Member(f"m{i}", hosts[i], free_port(), free_port()) for i in range(size)]
        self.token = f"hsu-test-{os.getpid()}-{time.monotonic_ns()}"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _argv(self, m: Member, state: str) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [
            self.exe,
            "--name", m.name,
            "--data-dir", str(self.base / m.name),
            "--listen-client-urls", f"http://{m.endpoint}",
            "--advertise-client-urls", f"http://{m.endpoint}",
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--log-outputs", str(self.base / f"{m.name}.log"),
            "--logger", "zap",
        ]  # fmt: skip
        ns = self.netns[self.members.index(m)]
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def start(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Start every member and wait until the cluster answers.

        A new cluster whose member finds a port taken (another process bound
        it between :func:`free_port` and etcd's own bind) is stopped, its
        data removed, and started again on new ports, at most ``attempts``
        times in all."""
        fresh = not any((self.base / m.name).exists() for m in self.members)
        for attempt in range(1, attempts + 1):
            for m in self.members:
                self.start_member(m, wait=False)
            try:
                self.wait_healthy(timeout)
                return
            except PortTaken:
                if not fresh or attempt == attempts:
                    raise
            for m in self.members:
                # thrown away with its data; without a quorum, SIGTERM waits
                self.stop_member(m, signal.SIGKILL)
                shutil.rmtree(self.base / m.name, ignore_errors=True)
                (self.base / f"{m.name}.log").unlink(missing_ok=True)
                m.client_port, m.peer_port = free_port(), free_port()
            self.token = f"hsu-test-{os.getpid()}-{time.monotonic_ns()}"

    def start_member(self, m: Member, *, wait: bool = True) -> None:
        state = "existing" if (self.base / m.name).exists() else "new"
        m.proc = subprocess.Popen(
            self._argv(m, state),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / f"{m.name}.stderr", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        if wait:
            self.wait_healthy()

    def stop_member(self, m: Member, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop one member by its pid (SIGKILL after ``timeout``)."""
        proc = m.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        m.proc = None

    def stop(self) -> None:
        for m in self.members:
            self.stop_member(m)

    def etcdctl(self, *args: str, endpoints: list[str] | None = None) -> str:
        """Run ``etcdctl`` (API v3) against the running members; its stdout."""
        eps = endpoints or [m.endpoint for m in self.members if m.running]
        ctl = shutil.which("etcdctl") or "/usr/bin/etcdctl"
        out = subprocess.run(
            [ctl, "--endpoints", ",".join(eps), "--dial-timeout", "2s", *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            check=True,
            timeout=20,
        )
        return out.stdout.decode()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until a write through every started member succeeds (bounded); a
        member that exited is an error naming it."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                # every member started and not stopped, each checked for an
                # exit just before its put (a put waits while there is no quorum)
                for m in self.members:
                    if m.proc is None:
                        continue
                    self._check_running(m)
                    self.etcdctl(
                        "put", "/hsu-test/health", "ok", "--command-timeout=1s",
                        endpoints=[m.endpoint],
                    )  # fmt: skip
                return
            except subprocess.SubprocessError as exc:
                last = repr(exc)
                time.sleep(0.1)
        raise TimeoutError(f"etcd cluster at {self.endpoints} not healthy in {timeout}s: {last}")

    def _check_running(self, m: Member) -> None:
        """Raise if ``m`` has exited, with the end of its log."""
        if m.proc is not None and m.proc.poll() is not None:
            log = (self.base / f"{m.name}.log").read_text(errors="replace")[-2000:]
            error = PortTaken if "address already in use" in log else RuntimeError
            raise error(f"etcd member {m.name} exited ({m.proc.returncode}): {log}")

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
