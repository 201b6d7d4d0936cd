"""Leadership for ``placement: singleton`` units on a real etcd cluster, with
three real ``hsu run`` kernels: one runs the unit, with its term's fencing
token; SIGKILL that kernel and its HSU and another kernel takes over, after
the lease; two never run it at once (looked at every 50 ms throughout)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import hsu_plugin_etcd
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hsu_plugin_etcd.cluster import LocalCluster

import hsu
from hsu.errors import ConfigError
from hsu.testing import build_kernel
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = "hsu.echo.v1.Echo"
FAST = {"leader_ttl": 3, "loop_wait": 0.5, "retry_timeout": 1.0, "ttl": 3}


def single_unit() -> dict[str, Any]:
    return {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "placement": "singleton",
        "stop_grace": 0.5,
        "routing": {"drain_timeout": 0.2},
    }


class Kernel:
    """``hsu run`` in a subprocess, its control and data planes on unix sockets."""

    def __init__(
        self,
        name: str,
        cluster: LocalCluster,
        tmp: Path,
        *,
        env: dict[str, str] | None = None,
        units: dict[str, Any] | None = None,
        watch_config: bool = False,
        wrap: Callable[[list[str]], list[str]] | None = None,
        kernel: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        deployment = {
            "name": name,
            "plugins": ["etcd"],
            "kernel": {
                "registry": "etcd",
                "drain_grace": 1,
                "watch_config": watch_config,
                **(kernel or {}),
            },
            "etcd": {"endpoints": cluster.endpoints, "node": name, **FAST},
            "units": {"single": single_unit()} if units is None else units,
        }
        path = tmp / f"{name}.yaml"
        path.write_text(json.dumps(deployment))
        self.control = f"unix:{tmp / name}.sock"
        env_extra = env
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
        env["HSU_RUNTIME_DIR"] = os.environ.get("HSU_RUNTIME_DIR", str(tmp))
        env["HSU_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        env.update(env_extra or {})
        self.log_path = tmp / f"{name}.log"
        self.log = (tmp / f"{name}.log").open("w")
        argv = [sys.executable, "-m", "hsu", "run", str(path), "--control", self.control,
                "--address", f"unix:{tmp / name}.data.sock"]  # fmt: skip
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.control) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"kernel {self.name} exited"
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.05)
        raise AssertionError(f"kernel {self.name} not SERVING in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def singletons() -> list[tuple[int, int, str, str]]:
    """Live processes of unit ``single`` under this test: (pid, kernel pid,
    instance id, fencing token)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            env = p.environ()
            if env.get("HSU_UNIT") == "single":
                found.append(
                    (p.pid, p.ppid(), env["HSU_INSTANCE_ID"], env.get("HSU_FENCING_TOKEN", ""))
                )
    return found


class Watch:
    """Counts the singleton's processes every 50 ms on a thread of its own."""

    def __init__(self) -> None:
        self.most = 0
        self.seen: dict[int, tuple[int, int, str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = singletons()
            self.most = max(self.most, len(now))
            for s in now:
                self.seen[s[0]] = s
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def until(check: Any, what: str, timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"not within {timeout}s: {what}")


@pytest.fixture
def kernels(etcd_cluster: LocalCluster, tmp_path: Path) -> Iterator[list[Kernel]]:
    started = [Kernel(n, etcd_cluster, tmp_path) for n in ("a", "b", "c")]
    try:
        for k in started:
            k.wait_ready()
        yield started
    finally:
        for k in started:
            k.stop()
        for pid, *_ in singletons():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_singleton_runs_once_and_fails_over_after_a_sigkill_never_twice(
    kernels: list[Kernel],
) -> None:
    watch = Watch()
    try:
        [(pid, leader_pid, inst, token)] = until(
            lambda: [s for s in singletons() if s[3]], "one kernel runs the singleton"
        )
        [leader] = [k for k in kernels if k.proc.pid == leader_pid]
        assert int(token) > 0
        # a kernel that does not lead routes to the leader's instance
        other = next(k for k in kernels if k is not leader)
        with hsu.connect_sync(other.control) as channel:
            reply = echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="x"), timeout=30
            )
        assert (reply.instance_id, reply.pid) == (inst, pid)
        # SIGKILL the leader's kernel and its HSU
        os.kill(leader.proc.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        leader.proc.wait(10)
        [(_, new_kernel, _, new_token)] = until(
            lambda: [s for s in singletons() if s[0] != pid and s[3]],
            "another kernel runs the singleton",
        )
        assert new_kernel != leader.proc.pid
        assert int(new_token) > int(token)  # a later term: a higher fencing token
    finally:
        watch.stop()
    assert watch.most == 1, f"two at once: {watch.seen}"


def test_settings_that_break_patronis_rule_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_kernel(
            {"etcd": {"leader_ttl": 5, "loop_wait": 2, "retry_timeout": 2}},
            plugins=[hsu_plugin_etcd],
        )
    text = str(info.value)
    assert (
        "etcd.retry_timeout: loop_wait (2) + 2 x retry_timeout (2) = 6 s"
        " is more than leader_ttl (5)" in text
    )
    assert "Patroni" in text


def test_a_singleton_that_cannot_stop_within_retry_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_kernel(
            {
                "etcd": {"retry_timeout": 3},
                "units": {"single": {**single_unit(), "stop_grace": 10}},
            },
            plugins=[hsu_plugin_etcd],
        )
    assert "units.single: stop_grace (10) + routing.drain_timeout (0.2)" in str(info.value)
