"""Resource limits against real processes: sampling, breaches, rlimits at spawn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import attrs
import psutil
import pytest
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from hsu._kernel.config.model import converter
from hsu._kernel.supervision.resources import (
    MIB,
    LimitAction,
    ResourceLimits,
    Sampler,
    check_rlimits,
)
from hsu.ports import LaunchSpec, Usage
from hsu.process import RESOURCES, rlimits_argv
from hsu_plugins.launch.subprocess import SubprocessLauncher
from hsu_plugins.watch.limits import breaches

#: the child says "ready" once it holds what the test measures, then waits on stdin
HOLD = "print('ready', flush=True)\nsys.stdin.read()\n"


@contextlib.contextmanager
def child(code: str) -> Iterator[subprocess.Popen[str]]:
    """A python child running ``code``, killed with its descendants at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys\n" + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for descendant in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.kill()
        proc.kill()
        proc.communicate()


def sample(sampler: Sampler, pid: int) -> Usage:
    usage = sampler.sample(pid)
    assert usage is not None
    return usage


BUSY = """
import time
deadline = time.monotonic() + 5
print('ready', flush=True)
while time.monotonic() < deadline:
    pass
"""


# --- config


def test_defaults_and_structure_from_config() -> None:
    assert ResourceLimits() == ResourceLimits(interval=10.0, action=LimitAction.LOG, rlimits={})
    limits = converter.structure(
        {"interval": 5, "rss_mb": 512, "open_files": 1024, "action": "restart",
         "rlimits": {"nofile": 4096, "core": 0}},
        ResourceLimits,
    )  # fmt: skip
    assert limits.interval == 5.0
    assert limits.rss_mb == 512
    assert limits.action is LimitAction.RESTART
    assert limits.rlimits == {"nofile": 4096, "core": 0}


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        ResourceLimits(interval=0)
    with pytest.raises(ValueError):
        ResourceLimits(open_files=-1)
    with pytest.raises(ClassValidationError) as extra:
        converter.structure({"nope": 1}, ResourceLimits)
    assert isinstance(extra.value.exceptions[0], ForbiddenExtraKeysError)
    with pytest.raises(ClassValidationError):
        converter.structure({"action": "explode"}, ResourceLimits)


# --- sampling real processes


def test_memory_of_a_child_holding_60_mib() -> None:
    code = "data = b'x' * (60 * 1024 * 1024)\n" + HOLD
    with child(code) as proc:
        usage = sample(Sampler(), proc.pid)
    assert usage.pid == proc.pid
    assert usage.rss >= 50 * MIB
    assert usage.threads >= 1
    assert usage.children == 0
    assert usage.cpu_percent == 0.0  # first sample
    (line,) = breaches(ResourceLimits(rss_mb=40), usage)
    assert line.startswith("rss ") and line.endswith(" MiB > limit 40 MiB")
    assert float(line.split()[1]) >= 50
    assert breaches(ResourceLimits(rss_mb=100_000), usage) == []


def test_descendants_are_counted() -> None:
    code = """
    import subprocess
    kids = [subprocess.Popen(['sleep', '60']) for _ in range(2)]
    print('ready', flush=True)
    sys.stdin.read()
    for k in kids:
        k.kill()
        k.wait()
    """
    with child(code) as proc:
        alone = psutil.Process(proc.pid).memory_info().rss
        usage = sample(Sampler(), proc.pid)
    assert usage.children == 2
    assert usage.threads >= 3
    assert usage.rss > alone
    assert breaches(ResourceLimits(children=1, threads=2), usage) == [
        f"threads {usage.threads} > limit 2",
        "children 2 > limit 1",
    ]
    assert breaches(ResourceLimits(children=2, threads=1000), usage) == []


def test_a_deeper_tree_is_walked_through_one_and_many_thread_processes() -> None:
    """A one-thread process's children come from its /proc children file, a
    process with threads' from the host's listing: both together find what
    psutil's children(recursive=True) finds."""
    from hsu._kernel.supervision import resources

    middle = """
    import subprocess, sys, threading
    def spawn():  # children of the second thread: not in the main one's file
        kids.extend(subprocess.Popen(['sleep', '60']) for _ in range(2))
        print('ready', flush=True)
        sys.stdin.read()
    kids = []
    threading.Thread(target=spawn, daemon=True).start()
    threading.Event().wait()
    """
    code = f"""
    import subprocess
    mid = subprocess.Popen([sys.executable, '-c', {textwrap.dedent(middle)!r}],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert mid.stdout.readline().strip() == 'ready'
    sh = subprocess.Popen(['sh', '-c', 'sleep 60 & sleep 60 & wait'])
    print('ready', flush=True)
    sys.stdin.read()
    """
    with child(code) as proc:
        tree = psutil.Process(proc.pid).children(recursive=True)
        deadline = time.monotonic() + 10
        while len(tree) < 6 and time.monotonic() < deadline:  # sh's sleeps start
            time.sleep(0.05)
            tree = psutil.Process(proc.pid).children(recursive=True)
        assert psutil.Process(proc.pid).num_threads() == 1
        usage = sample(Sampler(), proc.pid)
        (many,) = Sampler().sample_many([(proc.pid, None)], open_files=False)
        threads = sum(p.num_threads() for p in [psutil.Process(proc.pid), *tree])
    assert resources._children_files()  # Linux with CONFIG_PROC_CHILDREN
    assert len(tree) == 6  # the middle one and its 2 sleeps, sh and its 2
    assert usage.children == 6
    assert many is not None and many.children == 6
    assert usage.threads == threads


def test_a_children_file_longer_than_a_page_is_read_to_its_end() -> None:
    # /proc's children file comes a page at a time: the child makes more
    code = """
    import os
    me = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    kids = []
    while len(open(me, "rb").read()) <= 4200:
        kids += [os.posix_spawnp("sleep", ["sleep", "60"], os.environ) for _ in range(100)]
    print("ready", flush=True)
    print(len(kids), flush=True)
    sys.stdin.read()
    """
    with child(code) as proc:
        assert proc.stdout is not None
        made = int(proc.stdout.readline())
        usage = sample(Sampler(), proc.pid)
    assert made >= 700
    assert usage.children == made


def test_an_instance_cgroup_counts_what_left_the_tree() -> None:
    # a process that is not a descendant (a daemon that left its HSU's tree)
    # counts when the instance's cgroup lists it, and the tree is not walked
    with child(HOLD) as proc, child("data = b'x' * (30 * 1024 * 1024)\n" + HOLD) as stray:
        tree = sample(Sampler(), proc.pid)
        usage = Sampler().sample(proc.pid, [proc.pid, stray.pid, 2**22 + 1])
        assert usage is not None
        stray_rss = psutil.Process(stray.pid).memory_info().rss
    assert tree.children == 0
    assert usage.children == 1  # the stray; a pid that is gone is left out
    assert usage.rss >= tree.rss + stray_rss - 5 * MIB
    assert usage.threads >= tree.threads + 1


def test_open_files_of_the_main_process() -> None:
    code = "import os\nfiles = [open(os.devnull) for _ in range(50)]\n" + HOLD
    with child(code) as proc:
        usage = sample(Sampler(), proc.pid)
    assert usage.open_files >= 50
    assert breaches(ResourceLimits(open_files=20), usage) == [
        f"open files {usage.open_files} > limit 20"
    ]
    assert breaches(ResourceLimits(open_files=10_000), usage) == []


def test_one_read_of_proc_stat_gives_psutils_figures() -> None:
    """The sampler reads /proc/<pid>/stat once per process; what it reads is
    what psutil's calls say (the prometheus exporter's figures keep their meaning)."""
    from hsu._kernel.supervision.resources import _read_proc, _read_psutil

    code = "import threading\ndata = b'x' * (20 * 1024 * 1024)\n"
    code += "threading.Thread(target=sys.stdin.read, daemon=True).start()\n" + HOLD
    with child(code) as proc:
        ps = psutil.Process(proc.pid)
        ours, theirs = _read_proc(proc.pid), _read_psutil(proc.pid)
        assert ours is not None and theirs is not None
        assert ours == theirs  # a process that waits on stdin changes nothing in between
        assert ours.rss == ps.memory_info().rss >= 20 * MIB
        assert ours.cpu == pytest.approx(sum(ps.cpu_times()[:2]))
        assert ours.create_time == pytest.approx(ps.create_time(), abs=0.01)
        assert ours.threads == ps.num_threads() == 2
        assert ours.ppid == os.getpid()
        usage = sample(Sampler(), proc.pid)
        assert usage.open_files == ps.num_fds()
        assert usage.rss == ours.rss and usage.threads == 2


def test_sample_many_counts_each_roots_descendants_as_sample_does() -> None:
    code = """
    import subprocess
    kids = [subprocess.Popen(['sleep', '60']) for _ in range(2)]
    print('ready', flush=True)
    sys.stdin.read()
    for k in kids:
        k.kill()
    """
    with child(code) as a, child(code) as b, child(HOLD) as alone:
        roots = [(a.pid, None), (b.pid, None), (alone.pid, None), (2**22 + 1, None)]
        many = Sampler().sample_many(roots)
        one = [Sampler().sample(pid) for pid, _ in roots]
        bare = Sampler().sample_many(roots, open_files=False)
    assert [u.children if u else None for u in many] == [2, 2, 0, None]
    assert [u.children if u else None for u in one] == [2, 2, 0, None]
    assert many[0] is not None and one[0] is not None and bare[0] is not None
    assert many[0].open_files == one[0].open_files > 0 and bare[0].open_files == 0
    assert many[0].threads == one[0].threads == bare[0].threads == 3


def test_cpu_percent_is_a_delta_between_samples() -> None:
    sampler = Sampler()
    with child(BUSY) as proc:
        busy = psutil.Process(proc.pid)
        first = sample(sampler, proc.pid)
        t1, c1 = time.monotonic(), sum(busy.cpu_times()[:2])
        time.sleep(1.0)
        t2, c2 = time.monotonic(), sum(busy.cpu_times()[:2])
        second = sample(sampler, proc.pid)
    assert first.cpu_percent == 0.0
    # what the process really used, measured beside the sampler (a loaded
    # machine gives the busy loop less than a core)
    used = (c2 - c1) / (t2 - t1) * 100
    assert used > 1
    assert 0.5 * used < second.cpu_percent < 2 * used + 5
    # a limit below what it used (a loaded machine may give it under 10 %)
    limit = int(second.cpu_percent // 2)
    (line,) = breaches(ResourceLimits(cpu_percent=limit), second)
    assert line.startswith("cpu ") and line.endswith(f"% > limit {limit}%")
    assert breaches(ResourceLimits(cpu_percent=10_000), second) == []


def test_cpu_of_a_descendant_born_between_samples_counts() -> None:
    code = f"""
    import subprocess
    print('ready', flush=True)
    sys.stdin.readline()
    busy = subprocess.Popen([sys.executable, '-c', {BUSY!r}], stdout=subprocess.PIPE, text=True)
    busy.stdout.readline()
    print('spawned', flush=True)
    sys.stdin.read()
    busy.kill()
    busy.wait()
    """
    sampler = Sampler()
    with child(code) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        first = sample(sampler, proc.pid)
        t1 = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "spawned"
        time.sleep(1.0)
        (busy,) = psutil.Process(proc.pid).children()
        busy_cpu = sum(busy.cpu_times()[:2])  # all of it since the first sample
        second = sample(sampler, proc.pid)
        elapsed = time.monotonic() - t1
    assert first.children == 0
    assert second.children == 1
    # the descendant's CPU counts: at least half of what it used, measured beside
    assert busy_cpu > 0.01
    assert second.cpu_percent > 0.5 * busy_cpu / elapsed * 100


def test_forget_and_pid_reuse_start_afresh() -> None:
    sampler = Sampler()
    with child(BUSY) as proc:
        sample(sampler, proc.pid)
        sampler.forget(proc.pid)
        assert sample(sampler, proc.pid).cpu_percent == 0.0
        time.sleep(0.5)
        # a process with this pid but another create time: the pid was reused
        seen = sampler._seen[proc.pid]
        sampler._seen[proc.pid] = attrs.evolve(seen, create_time=seen.create_time - 100)
        assert sample(sampler, proc.pid).cpu_percent == 0.0
        time.sleep(0.5)
        assert sample(sampler, proc.pid).cpu_percent > 0
    sampler.forget(proc.pid)
    sampler.forget(proc.pid)  # forgetting twice, or an unknown pid, is fine


def test_a_dead_process_samples_as_none() -> None:
    sampler = Sampler()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    sampler.sample(proc.pid)  # None if it already exited
    proc.wait()
    assert sampler.sample(proc.pid) is None
    assert proc.pid not in sampler._seen


def test_a_zombie_samples_as_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "child did not exit"
            time.sleep(0.01)
        assert Sampler().sample(proc.pid) is None
    finally:
        proc.wait()


# --- rlimits


#: a resource's row in /proc/<pid>/limits
LIMITS_ROWS = {"nofile": "Max open files", "core": "Max core file size", "as": "Max address space"}


async def launched_limits(rlimits: dict[str, int]) -> dict[str, tuple[str, str]]:
    """The soft and hard limits of a process the launcher starts with ``rlimits``,
    read from its /proc/<pid>/limits once ``prlimit`` has exec'd it."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    spec = LaunchSpec("t", "t-1", [sleep, "60"], dict(os.environ), rlimits=rlimits)
    handle = await SubprocessLauncher().launch(spec)
    try:
        real, deadline = os.path.realpath(sleep), time.monotonic() + 10  # noqa: ASYNC240
        while os.readlink(f"/proc/{handle.pid}/exe") != real:
            assert time.monotonic() < deadline, "prlimit did not exec the command"
            await asyncio.sleep(0.005)
        with open(f"/proc/{handle.pid}/limits") as f:  # noqa: ASYNC230
            rows = f.read().splitlines()
    finally:
        handle.signal(signal.SIGKILL)
        await handle.wait()
    found = {}
    for name, label in LIMITS_ROWS.items():
        [row] = [r for r in rows if r.startswith(label)]
        soft, hard = row[len(label) :].split()[:2]
        found[name] = (soft, hard)
    return found


async def test_rlimits_are_applied_to_the_launched_process() -> None:
    rlimits = {"nofile": 256, "core": 0}
    if resource.getrlimit(resource.RLIMIT_AS)[1] == resource.RLIM_INFINITY:
        rlimits["as"] = -1
    found = await launched_limits(rlimits)
    assert found["nofile"] == ("256", "256")
    assert found["core"] == ("0", "0")
    if "as" in rlimits:
        assert found["as"] == ("unlimited", "unlimited")
    # the parent is untouched
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (256, 256)


def test_rlimits_argv_are_prlimit_options_and_bad_names_raise() -> None:
    assert rlimits_argv({}) == []
    assert rlimits_argv({"nofile": 256, "core": 0, "as": -1}) == [
        "--nofile=256:256",
        "--core=0:0",
        "--as=unlimited:unlimited",
    ]
    assert rlimits_argv({"ofile": 64}) == ["--nofile=64:64"]  # the old name of nofile
    with pytest.raises(ValueError, match="nofle"):
        rlimits_argv({"nofle": 1})
    with pytest.raises(ValueError, match="nofile"):
        rlimits_argv({"nofile": -2})
    with pytest.raises(ValueError, match="core"):
        rlimits_argv({"core": True})


def test_every_resource_has_a_prlimit_option() -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "util-linux's prlimit is needed to set rlimits"
    usage = subprocess.run([prlimit, "--help"], capture_output=True, text=True).stdout
    for name in RESOURCES:
        [option] = rlimits_argv({name: 1})
        assert f" --{option.removeprefix('--').split('=')[0]} " in usage, name


def test_check_rlimits_accepts_good_ones() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert check_rlimits({}) == []
    assert check_rlimits({"nofile": min(256, hard), "core": 0, "as": 2**32}) == []
    assert check_rlimits({"nofile": hard}, privileged=False) == []


def test_check_rlimits_problems() -> None:
    assert check_rlimits({"nofle": 1}) == [
        "rlimits.nofle: unknown resource; did you mean 'nofile'?"
    ]
    assert check_rlimits({"zzzzzz": 1}) == ["rlimits.zzzzzz: unknown resource"]
    assert check_rlimits({"core": -5}) == ["rlimits.core: -5 is negative (-1 means unlimited)"]
    assert check_rlimits({"core": True}) == ["rlimits.core: expected an integer, got True"]
    assert check_rlimits({"core": 2**64}) == [
        f"rlimits.core: {2**64} is too large (at most {2**63 - 1})"
    ]
    if "ofile" in RESOURCES:
        assert check_rlimits({"nofile": 64, "ofile": 64}) == [
            "rlimits.ofile: the same resource as 'nofile'"
        ]
    (problem,) = check_rlimits({"nofile": 2**40}, privileged=True)
    assert problem.startswith(f"rlimits.nofile: {2**40} exceeds the system maximum")


def test_check_rlimits_above_the_hard_limit_needs_privilege() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = [
        f"rlimits.nofile: {hard + 1} exceeds the hard limit {hard} of this process "
        "(raising it needs privilege)"
    ]
    assert check_rlimits({"nofile": hard + 1}, privileged=False) == expected
    unlimited = check_rlimits({"nofile": -1}, privileged=False)
    assert unlimited and "unlimited exceeds" in unlimited[0]
    if os.geteuid() != 0:
        assert check_rlimits({"nofile": hard + 1}) == expected
