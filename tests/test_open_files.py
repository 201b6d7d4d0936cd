"""The kernel's open-files limit: raised at start, restored for the HSUs, and
an EMFILE that says what to change instead of a retry storm (issue 20)."""

from __future__ import annotations

import collections
import os
import re
import resource
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import KernelProcess, hsu_env, wait_until, write_deployment

pytestmark = pytest.mark.integration

PRLIMIT = shutil.which("prlimit")
needs_prlimit = pytest.mark.skipif(PRLIMIT is None, reason="util-linux prlimit not found")


def sleepers(n: int) -> str:
    return f"""\
name: files
kernel: {{reattach: false}}
units:
  sleeper:
    kind: managed
    command: [sleep, "1e6"]
    start: at-start
    min_instances: {n}
    max_instances: {n}
"""


class LimitedKernel(KernelProcess):
    """`hsu run` started under ``prlimit --nofile=SOFT:HARD``."""

    def __init__(self, deployment: Path, tmp_path: Path, soft: int, hard: int):
        import conftest

        saved = conftest.HSU
        conftest.HSU = [str(PRLIMIT), f"--nofile={soft}:{hard}", "--", *saved]
        try:
            super().__init__(deployment, f"unix:{tmp_path / 'k.sock'}", hsu_env(), logs=tmp_path)
        finally:
            conftest.HSU = saved

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture
def limited(tmp_path: Path):
    started: list[LimitedKernel] = []

    def start(n: int, soft: int, hard: int) -> LimitedKernel:
        d = tmp_path / f"k{len(started)}"
        d.mkdir()
        k = LimitedKernel(write_deployment(d / "d.yaml", sleepers(n)), d, soft, hard)
        started.append(k)
        return k

    yield start
    for k in started:
        if k.proc.poll() is None:
            k.proc.kill()
            k.proc.wait()


@needs_prlimit
def test_a_soft_limit_of_256_runs_200_instances_which_keep_256(limited):
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    if hard < 1024:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise to")
    k = limited(200, soft=256, hard=hard)
    wait_until(lambda: len(k.children()) == 200, 60)
    kernel = psutil.Process(k.proc.pid)
    # the kernel raised its soft limit to the hard one ...
    assert kernel.rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    # ... and every HSU starts with the limit the kernel was given
    limits = collections.Counter(c.rlimit(psutil.RLIMIT_NOFILE) for c in k.children())
    assert limits == {(256, hard): 200}
    assert all(c.name() == "sleep" for c in k.children())  # prlimit exec'd the command
    pids = [c.pid for c in k.children()]
    k.end()
    assert k.proc.returncode == 0, k.output()
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert "Too many open files" not in k.output()[1]


@needs_prlimit
def test_out_of_file_descriptors_is_a_clear_error_with_backoff_not_a_storm(limited):
    k = limited(200, soft=128, hard=128)  # nothing to raise to: most cannot start
    wait_until(lambda: "RLIMIT_NOFILE" in k.output()[1], 60)
    running = {c.pid for c in k.children()}
    assert 0 < len(running) < 200
    # let it try again: each instance waits at least 2 s after an EMFILE
    failing = 200 - len(running)
    wait_until(lambda: k.output()[1].count("RLIMIT_NOFILE") >= 3 * failing, 30)
    err = k.output()[1]
    line = next(x for x in err.splitlines() if "RLIMIT_NOFILE" in x)
    assert re.search(
        r"cannot start 'sleep': \[Errno 24\] Too many open files; the kernel has \d+ files"
        r" open and may open 128 \(RLIMIT_NOFILE, hard limit 128\): raise the limit",
        line,
    ), line
    attempts = collections.Counter(
        m.group(1) for m in re.finditer(r"\[(sleeper-\w+)\] .*RLIMIT_NOFILE", err)
    )
    assert len(attempts) == failing  # each one that could not start said why
    # a storm would be hundreds per instance (one line or two per attempt)
    assert max(attempts.values()) <= 8, attempts.most_common(3)
    # what runs keeps running, and the kernel stops them all
    assert running <= {c.pid for c in k.children()}
    k.end()
    assert k.proc.returncode == 0, err[-2000:]
    assert not [p for p in running if psutil.pid_exists(p)]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(k: LimitedKernel, n: int) -> int:
    """The kernel's open fds once its ``n`` instances run and the count holds
    still (a spawn opens the instance's log files for a moment)."""
    wait_until(lambda: len(k.children()) == n, 60)
    counts = [open_fds(k.proc.pid)]
    for _ in range(100):  # bounded: 100 x 0.2 s
        time.sleep(0.2)
        counts.append(open_fds(k.proc.pid))
        if len(counts) >= 3 and counts[-1] == counts[-2] == counts[-3]:
            return counts[-1]
    raise AssertionError(f"the kernel's open fds never held still: {counts[-10:]}")


@needs_prlimit
def test_an_idle_instance_holds_at_most_2_fds_of_the_kernel(limited):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    one, many = limited(1, soft=1024, hard=hard), limited(101, soft=1024, hard=hard)
    per_instance = (settled_fds(many, 101) - settled_fds(one, 1)) / 100
    # a pidfd; the stdout and stderr files are opened only to be read
    assert per_instance <= 2, per_instance
    for k in (one, many):
        k.end()
        assert k.proc.returncode == 0, k.output()[1][-2000:]


@needs_prlimit
def test_a_hard_limit_of_512_runs_200_instances(limited):
    # Nothing to raise to: 200 instances must fit in 512 fds with the
    # kernel's own (3 fds each, as before, would be over 600).
    k = limited(200, soft=512, hard=512)
    fds = settled_fds(k, 200)
    assert fds <= 512 - 50, fds  # room left for the calls the kernel serves
    pids = [c.pid for c in k.children()]
    k.end()
    assert k.proc.returncode == 0, k.output()[1][-2000:]
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert "Too many open files" not in k.output()[1]
