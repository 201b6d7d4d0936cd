"""`hsu reload` with many units (issue 20), side by side.

    python bench/reload.py --instances 1000 --rounds 7 [--tree before=DIR]

For each shape, one unit of N and N units of one (``kind: managed``, every
program ``sleep 1e6``, as bench/cli_reads.py), a kernel runs per code tree
(this checkout and each ``--tree LABEL=DIR``, whose ``kernel/`` and
``plugins/`` go first on ``PYTHONPATH``). With every kernel up at once, each
round runs, for each tree in turn (the order rotating), ``python -m hsu
reload`` three times: with nothing changed; with the middle unit's
``stop_grace`` changed (no new process); and, with N units of one, with its
``env`` changed too (its one instance restarted). Medians of wall time and of
the kernel's CPU time during the command, ms. A reload that fails, or does
not say what changed, stops the bench.

With ``--read-config``, no kernel: each round runs, per tree, a Python that
times ``loader.read_config`` of an N-unit file in process (median of 7 reads
after one), as a first read and, where the tree has it, as a reload does
(``previous=`` the deployment read before); CPU time, as the machine is
shared. Then, in a fresh Python per tree, what reading the N-unit file
costs in memory, after a one-unit file was read (imports done): VmRSS
growth after the first read and after three reloads, and tracemalloc's
live and peak bytes of the first read (the deployment kept).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import trees_and_limits
from cli_reads import PROGRAM, Kernel, cpu_of, env_for, med

KINDS = ("nothing", "one unit", "restart")


def deployment(n: int, units: int, change: str = "") -> str:
    per = n // units
    body = "".join(
        f"  s{i}:\n    kind: managed\n    command: [{', '.join(PROGRAM)}]\n"
        f"    start: at-start\n    min_instances: {per}\n    max_instances: {per}\n"
        + (change if i == units // 2 else "")
        for i in range(units)
    )
    return f"name: reads\nunits:\n{body}"


def reload(k: Kernel, expect: str) -> tuple[float, float]:
    """(wall seconds, kernel CPU seconds) of one ``hsu reload``; then a pause
    (the kernel takes five reloads in a burst, then one a second)."""
    before = cpu_of(k.proc.pid)
    t0 = time.perf_counter()
    done = subprocess.run(k.cli("reload"), env=k.env, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t0
    cpu = cpu_of(k.proc.pid) - before
    if done.returncode != 0 or done.stdout.strip() != expect:
        raise SystemExit(f"{k.label}: hsu reload: {done.stdout}{done.stderr} (expected {expect})")
    time.sleep(1.0)
    return wall, cpu


def shape(label: str, trees: dict[str, Path | None], n: int, units: int, rounds: int,
          root: Path) -> list[str]:  # fmt: skip
    kernels = [Kernel(name, tree, n, units, root) for name, tree in trees.items()]
    out = []
    mid = f"s{units // 2}"
    try:
        t0 = time.monotonic()
        for k in kernels:
            while k.ready() < n:
                if k.proc.poll() is not None or time.monotonic() - t0 > 600:
                    raise SystemExit(f"{k.label}: {k.ready()} of {n} ready; see {k.dir}")
                time.sleep(1)
        print(f"{label}: {len(kernels)} kernels with {n} ready", flush=True)
        res = {k.label: {m: ([], []) for m in KINDS} for k in kernels}
        env = ""  # the middle unit's env lines, as the last round left them
        for r in range(rounds):
            order = kernels[r % len(kernels) :] + kernels[: r % len(kernels)]
            grace = f"    stop_grace: {3 + r}\n"
            for k in order:
                path = k.dir / "deployment.yaml"
                steps = [("nothing", None, "reloaded: nothing changed")]
                steps.append(("one unit", grace + env, f"reloaded: changed {mid}"))
                if units > 1:
                    steps.append(("restart", grace + f"    env: {{R: '{r}'}}\n",
                                  f"reloaded: changed {mid}; restarted {mid}"))  # fmt: skip
                for kind, change, expect in steps:
                    if change is not None:
                        path.write_text(deployment(n, units, change))
                    wall, cpu = reload(k, expect)
                    res[k.label][kind][0].append(wall)
                    res[k.label][kind][1].append(cpu)
            if units > 1:
                env = f"    env: {{R: '{r}'}}\n"
        for k in kernels:
            x = res[k.label]
            cells = [f"{med(x[m][0])} ({med(x[m][1])})" if x[m][0] else "-" for m in KINDS]
            out.append(f"| {label} | {k.label} | " + " | ".join(cells) + " |")
            print(out[-1], flush=True)
    finally:
        for k in kernels:
            k.stop()
    return out


READ_CONFIG = """
import inspect, statistics, sys, time
from hsu._kernel.config import loader
from hsu._kernel.config.defaults import with_defaults
from hsu._kernel.plugins import PluginManager
ctx = loader.context([sys.argv[1]])
pm = PluginManager.load([], env=ctx.env)
prev = with_defaults(loader.read_config(pm, ctx), pm)
def run(**kw):
    ts = []
    for _ in range(7):
        t0 = time.process_time()
        loader.read_config(pm, ctx, **kw)
        ts.append(time.process_time() - t0)
    return statistics.median(ts)
first = run()
again = run(previous=prev) if "previous" in inspect.signature(loader.read_config).parameters else 0
print(first, again)
"""


READ_MEMORY = """
import gc, sys, tracemalloc
from hsu._kernel.config import loader
from hsu._kernel.config.defaults import with_defaults
from hsu._kernel.plugins import PluginManager
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
small, big = (loader.context([p]) for p in sys.argv[1:3])
pm = PluginManager.load([], env=small.env)
keep = with_defaults(loader.read_config(pm, small), pm)
gc.collect()
if sys.argv[3] == "trace":
    tracemalloc.start()
    d = with_defaults(loader.read_config(pm, big), pm)
    print(*(x // 1024 for x in tracemalloc.get_traced_memory()))
else:
    before = rss()
    d = with_defaults(loader.read_config(pm, big), pm)
    first = rss() - before
    for _ in range(3):
        d = with_defaults(loader.read_config(pm, big, previous=d), pm)
    print(first, rss() - before)
"""


def read_memory(trees: dict[str, Path | None], root: Path) -> list[str]:
    small = root / "one.yaml"
    small.write_text(deployment(1, 1))
    big = str(root / "deployment.yaml")
    out = []
    for t, tree in trees.items():
        got = []
        for how in ("rss", "trace"):
            argv = [sys.executable, "-c", READ_MEMORY, str(small), big, how]
            done = subprocess.run(argv, env=env_for(tree), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            got += done.stdout.split()
        out.append(f"| {t} | +{got[0]} | +{got[1]} | {got[2]} | {got[3]} |")
    return out


def read_config(trees: dict[str, Path | None], n: int, rounds: int, root: Path) -> list[str]:
    path = root / "deployment.yaml"
    path.write_text(deployment(n, n))
    names = list(trees)
    res: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in names}
    for r in range(rounds):
        for t in names[r % len(names) :] + names[: r % len(names)]:
            argv = [sys.executable, "-c", READ_CONFIG, str(path)]
            done = subprocess.run(argv, env=env_for(trees[t]), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            first, again = (float(x) for x in done.stdout.split())
            res[t][0].append(first)
            res[t][1].append(again)
    return [
        f"| {t} | {med(first)} | {med(again) if any(again) else '-'} |"
        for t, (first, again) in res.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--read-config", action="store_true", help="in process, no kernel")
    args = parser.parse_args(argv)
    trees = trees_and_limits(args.tree)
    if args.read_config:
        with tempfile.TemporaryDirectory(prefix="hsu-read-config-") as tmp:
            rows = read_config(trees, args.instances, args.rounds, Path(tmp))
            memory = read_memory(trees, Path(tmp))
        print(f"load average at end: {os.getloadavg()}")
        print(f"\nread_config of {args.instances} units, CPU ms, medians of {args.rounds} runs")
        print("| tree | first read | reload (previous=) |\n| --- | ---: | ---: |")
        print("\n".join(rows))
        print(f"\nmemory of reading {args.instances} units, KiB (VmRSS; tracemalloc)")
        print("| tree | RSS, first read | RSS, after 3 reloads | live | peak |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print("\n".join(memory))
        return 0
    lines = [
        "| shape | tree | nothing changed | one unit changed | its instance restarted |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    n = args.instances
    with tempfile.TemporaryDirectory(prefix="hsu-reload-") as tmp:
        lines += shape(f"{n} units of one", trees, n, n, args.rounds, Path(tmp))
        lines += shape(f"one unit of {n}", trees, n, 1, args.rounds, Path(tmp))
    print(f"load average at end: {os.getloadavg()}")
    print("\nwall ms (kernel CPU ms), medians of", args.rounds)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
