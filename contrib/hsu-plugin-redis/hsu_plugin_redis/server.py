"""A local redis-server for tests and benchmarks: Debian's ``redis-server``
on a loopback port or a unix socket, its data in one directory (0700),
started and stopped by its pid. Never the system service.

Not used by the plugin itself; the tests and ``bench/storage.py`` use it, as
``hsu_plugin_etcd.cluster.LocalCluster`` is used for etcd.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: the executable; $HSU_REDIS_SERVER overrides the PATH lookup
REDIS_SERVER = "redis-server"


def redis_executable() -> str | None:
    """Where redis-server is, or None."""
    found = os.environ.get("HSU_REDIS_SERVER") or shutil.which(REDIS_SERVER)
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """One redis-server with its files under ``base``.

    :param unix: listen on ``base/redis.sock`` only (no TCP port)
    :param durable: ``appendonly yes`` with ``appendfsync always``: a write is
        fsynced before the server answers it; otherwise no persistence at all
        (``--save '' --appendonly no``)
    """

    def __init__(
        self, base: Path, *, unix: bool = False, durable: bool = False, host: str = "127.0.0.1"
    ) -> None:
        exe = redis_executable()
        if exe is None:
            raise FileNotFoundError("redis-server: not on PATH nor at /usr/bin/redis-server")
        self.exe = exe
        self.base = base
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(base, 0o700)
        self.unix = unix
        self.durable = durable
        self.host = host
        self.port = 0 if unix else free_port(host)
        self.socket = base / "redis.sock"
        if unix and len(str(self.socket).encode()) > 107:
            raise ValueError(f"{self.socket}: too long for a unix socket path (107 bytes)")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What ``redis.address`` takes."""
        if self.unix:
            return f"unix:{self.socket}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        argv = [
            self.exe,
            "--port", str(self.port),
            "--dir", str(self.base),
            "--logfile", str(self.base / "redis.log"),
            "--daemonize", "no",
            "--save", "",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.port:
            argv += ["--bind", self.host]
        if self.unix:
            argv += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        if self.durable:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def start(self, timeout: float = 20.0) -> None:
        """Start it (again, on the same port and files) and wait until it answers PING."""
        if self.running:
            return
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "redis.stderr", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.base / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {log}")
            try:
                if self.ping():
                    return
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server at {self.address} did not answer in {timeout}s: {last}")

    def ping(self) -> bool:
        """True when the server answers PING with PONG (not LOADING)."""
        if self.unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = str(self.socket)
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            target = (self.host, self.port)
        with s:
            s.settimeout(1.0)
            s.connect(target)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop it by its pid (SIGKILL after ``timeout``); ``sig`` SIGKILL: a crash."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash (what it fsynced stays)."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
