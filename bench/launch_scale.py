"""Launch and stop of many instances, this checkout against another one.

``python bench/launch_scale.py --rounds 3 [--base DIR]`` times, for each
shape, ``hsu run deployment.yaml`` from its spawn to every ``sleep 1e6``
running (its children's argv polled from /proc), then SIGTERM to the kernel
gone and every child with it, and the CPU the kernel (all its threads) and
its children (each ``sleep``, which counts the exec wrappers it went
through) used until all ran, and of the kernel's the main thread's alone
(its event loop; the rest is the spawn thread's file and cgroup creation,
gRPC's and the log threads'). Shapes: ``floor`` and ``floor1000``
(``bench/launch_floor.py``: hsu's required dependencies imported, then 10 or
1000 ``Popen()``), ``10`` (one unit of 10), ``1000`` (one unit of 1000) and
``1000x1`` (1000 units of one); each
kernel runs under ``ulimit -n 4096``. With ``--base DIR`` (a checkout of
another commit: its ``kernel/``, ``plugins/`` and ``contrib/*/`` first on
``PYTHONPATH``),
both are run in every round, alternating, so both see the same load; the
medians are printed side by side. Every kernel is stopped by pid (SIGTERM),
and any ``sleep`` it leaves is SIGKILLed through its pidfd. The runs' directories
(a launch of 1000 leaves 2000 log files) are removed at the end, not after
each run: on an ext4 without a journal, as this machine's, every file
created scans past the inodes freed in the last minutes, so a run right
after another's removal paid for it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ("sleep", "1e6")
NOFILE = 4096
SHAPES = {
    "floor": (10, 1), "floor1000": (1000, 1), "10": (10, 1), "1000": (1000, 1),
    "1000x1": (1000, 1000),
}  # fmt: skip


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


def sleeping(pid: int, known: dict[int, int]) -> int:
    """How many of ``pid``'s children run ``sleep 1e6`` now (remembered in
    ``known`` with a pidfd each, so a pid used again is never taken for one)."""
    n = 0
    for child in children(pid):
        if child in known:
            n += 1
            continue
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"sleep" and argv[1:2] == [b"1e6"]:
            try:
                known[child] = os.pidfd_open(child)
            except OSError:
                continue
            n += 1
    return n


def cpu(pid: int, *, main_only: bool = False) -> float:
    """Seconds on CPU of ``pid``, all its threads (or its main thread),
    across its execs (schedstat: ns)."""
    total = 0
    try:
        tasks = [str(pid)] if main_only else os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def config(n: int, units: int) -> str:
    per = n // units
    body = "".join(
        f"  s{i}:\n    kind: managed\n    command: [{', '.join(PROGRAM)}]\n"
        f"    start: at-start\n    min_instances: {per}\n    max_instances: {per}\n"
        for i in range(units)
    )
    # port 0: the default data address may be taken on a shared machine
    return f"name: bench\nkernel:\n  address: 127.0.0.1:0\nunits:\n{body}"


def nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def one(shape: str, base: Path | None, dirs: list[Path]) -> tuple[float, ...]:
    """(launch -> all running, SIGTERM -> all gone, the daemon's CPU and its
    children's until all ran, the daemon's main thread's) in seconds; the
    run's directory is added to ``dirs``."""
    n, units = SHAPES[shape]
    d = Path(tempfile.mkdtemp(prefix=f"hsu-launch-{shape}-"))
    dirs.append(d)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if base is not None:
        # the base's contrib distributions too, when it has them: the kernel
        # loads every installed plugin
        contrib = sorted(str(p) for p in (base / "contrib").glob("*") if p.is_dir())
        env["PYTHONPATH"] = ":".join([str(base / "kernel"), str(base / "plugins"), *contrib])
    if shape.startswith("floor"):
        argv = [sys.executable, str(ROOT / "bench" / "launch_floor.py"), str(n), *PROGRAM]
    else:
        (d / "deployment.yaml").write_text(config(n, units))
        hsu = str(Path(sys.executable).parent / "hsu")
        argv = [hsu, "run", "deployment.yaml", "--control", f"unix:{d}/control.sock"]
    known: dict[int, int] = {}
    out = open(d / "daemon.out", "wb")  # noqa: SIM115 - the child keeps it
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=d, stdout=out, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=nofile)  # fmt: skip
    out.close()
    try:
        deadline = t0 + 300
        while sleeping(proc.pid, known) < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{shape}: {len(known)} of {n} running; see {d}/daemon.out")
            time.sleep(0.01)
        launch = time.monotonic() - t0
        own, kids = cpu(proc.pid), sum(cpu(p) for p in known)
        loop = cpu(proc.pid, main_only=True)
        time.sleep(1.0)
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        while any(_alive(fd) for fd in known.values()):
            time.sleep(0.01)
        stop = time.monotonic() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in known.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
    return launch, stop, own, kids, loop


def _alive(pidfd: int) -> bool:
    """Whether the process has not exited (a pidfd is readable once it has)."""
    return not select.select([pidfd], [], [], 0)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", type=Path, help="a checkout to compare with (before)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a pidfd per program
    shapes = args.shapes.split(",")
    variants: list[tuple[str, Path | None]] = [("this", None)]
    if args.base is not None:
        variants.insert(0, ("base", args.base.resolve()))
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    dirs: list[Path] = []
    print(f"load average before: {os.getloadavg()}", flush=True)
    try:
        for r in range(args.rounds):
            for shape in shapes:
                order = variants if r % 2 == 0 else variants[::-1]
                for name, base in order:
                    if shape.startswith("floor") and name == "base":
                        continue
                    got = one(shape, base, dirs)
                    results.setdefault((shape, name), []).append(got)
                    print(f"round {r + 1} {shape:9} {name:5} launch {got[0]:7.3f} s"
                          f"  stop {got[1]:7.3f} s  cpu {got[2]:6.2f} s (loop {got[4]:5.2f} s)"
                          f" + children {got[3]:6.2f} s",
                          flush=True)  # fmt: skip
        print(f"load average after: {os.getloadavg()}")
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    print(
        "\nmedians: launch -> all running / SIGTERM -> all gone / the daemon's CPU"
        " (its main thread's) + its children's (the exec wrappers') until all ran"
    )
    for shape in shapes:
        row = []
        for name, _ in variants:
            got = results.get((shape, name))
            if got:
                m = [statistics.median(g[i] for g in got) for i in range(5)]
                row.append(
                    f"{name}: {m[0]:.3f} s / {m[1]:.3f} s / {m[2]:.2f} ({m[4]:.2f}) + {m[3]:.2f} s"
                )
        print(f"  {shape:9} " + "   ".join(row))


if __name__ == "__main__":
    main()
