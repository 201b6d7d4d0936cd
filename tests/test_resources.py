"""Resource limits against real processes: sampling, breaches, rlimits at spawn."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import attrs
import psutil
import pytest
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from hsu.config import converter
from hsu.resources import (
    MIB,
    RESOURCES,
    LimitAction,
    ResourceLimits,
    Sampler,
    Usage,
    breaches,
    check_rlimits,
    rlimits_preexec,
)

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


def test_open_files_of_the_main_process() -> None:
    code = "import os\nfiles = [open(os.devnull) for _ in range(50)]\n" + HOLD
    with child(code) as proc:
        usage = sample(Sampler(), proc.pid)
    assert usage.open_files >= 50
    assert breaches(ResourceLimits(open_files=20), usage) == [
        f"open files {usage.open_files} > limit 20"
    ]
    assert breaches(ResourceLimits(open_files=10_000), usage) == []


def test_cpu_percent_is_a_delta_between_samples() -> None:
    sampler = Sampler()
    with child(BUSY) as proc:
        first = sample(sampler, proc.pid)
        time.sleep(1.0)
        second = sample(sampler, proc.pid)
    assert first.cpu_percent == 0.0
    assert second.cpu_percent > 20
    (line,) = breaches(ResourceLimits(cpu_percent=10), second)
    assert line.startswith("cpu ") and line.endswith("% > limit 10%")
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
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "spawned"
        time.sleep(1.0)
        second = sample(sampler, proc.pid)
    assert first.children == 0
    assert second.children == 1
    assert second.cpu_percent > 20


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


def limits_in_child(rlimits: dict[str, int], name: str) -> str:
    code = f"import resource; print(resource.getrlimit(resource.RLIMIT_{name.upper()}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=rlimits_preexec(rlimits),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_rlimits_are_applied_in_the_child() -> None:
    assert limits_in_child({"nofile": 256}, "nofile") == "(256, 256)"
    assert limits_in_child({"core": 0, "nofile": 300}, "core") == "(0, 0)"
    # the parent is untouched
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (256, 256)


def test_rlimits_preexec_of_nothing_is_none_and_bad_names_raise() -> None:
    assert rlimits_preexec({}) is None
    with pytest.raises(ValueError, match="nofle"):
        rlimits_preexec({"nofle": 1})
    with pytest.raises(ValueError, match="nofile"):
        rlimits_preexec({"nofile": -2})


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
