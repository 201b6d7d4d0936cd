"""RSS per instance of ``hsu run``, side by side for several source trees
(not part of ``nox -s bench``).

``python bench/rss_per_instance.py --src OLD --src NEW --rounds 3`` runs, in
alternating rounds, ``hsu run`` of each tree (``OLD/kernel`` and
``OLD/plugins`` first on ``PYTHONPATH``; the installed distributions and
their entry points stay) with one managed ``sleep 1000000`` instance, one
unit of N and N units of one; reads the kernel's VmRSS 6 s after all N run,
and prints the medians and KiB per instance ((RSS at N - RSS at 1) / (N -
1)). A first run of each tree (its bytecode compiled) is not counted. Raise
``ulimit -n`` to 4096 first. Each kernel is stopped by its pid (SIGTERM: it
stops its instances).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SHAPES = ((1, 1), ("N", 1), ("N", "N"))


def measure(src: str, n: int, units: int) -> int:
    """VmRSS in KiB of ``hsu run`` once ``n`` instances in ``units`` units run, + 6 s."""
    with tempfile.TemporaryDirectory(prefix="hsu-rss-") as d:
        per = n // units
        body = "".join(
            f"  s{i}:\n    kind: managed\n    command: [sleep, '1000000']\n"
            f"    start: at-start\n    min_instances: {per}\n    max_instances: {per}\n"
            for i in range(units)
        )
        Path(d, "deployment.yaml").write_text(f"name: bench\nunits:\n{body}")
        env = dict(os.environ, PYTHONPATH=f"{src}/kernel{os.pathsep}{src}/plugins")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        hsu = str(Path(sys.executable).with_name("hsu"))
        argv = [hsu, "run", "deployment.yaml", "--address", f"unix:{d}/k.sock"]
        kernel = subprocess.Popen(
            [*argv, "--control", f"unix:{d}/c.sock"],
            cwd=d,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            me, deadline = psutil.Process(kernel.pid), time.monotonic() + 120
            while sum(c.name() == "sleep" for c in me.children()) < n:
                if time.monotonic() > deadline or kernel.poll() is not None:
                    raise SystemExit(f"{src}: {n} instances did not all start")
                time.sleep(0.2)
            time.sleep(6)
            return int(me.memory_info().rss // 1024)
        finally:
            kernel.send_signal(signal.SIGTERM)
            try:
                kernel.wait(60)
            except subprocess.TimeoutExpired:
                kernel.kill()
                kernel.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", action="append", required=True, help="a source tree (repeat)")
    ap.add_argument("-n", type=int, default=1000, help="N (default 1000)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    args.src = [str(Path(s).resolve()) for s in args.src]
    shapes = [tuple(args.n if x == "N" else x for x in s) for s in SHAPES]
    seen: dict[tuple[str, int, int], list[int]] = {}
    for src in args.src:  # not counted: a tree's first run compiles its bytecode
        measure(src, 1, 1)
    for r in range(args.rounds):
        for src in args.src:
            for n, units in shapes:
                kib = measure(src, int(n), int(units))
                seen.setdefault((src, int(n), int(units)), []).append(kib)
                print(f"round {r + 1} {src} {n} in {units} unit(s): {kib} KiB", flush=True)
    for src in args.src:
        one = statistics.median(seen[(src, 1, 1)])
        big = statistics.median(seen[(src, args.n, 1)])
        many = statistics.median(seen[(src, args.n, args.n)])
        print(
            f"{src}: 1 instance {one / 1024:.1f} MiB; one unit of {args.n} {big / 1024:.1f} MiB"
            f" ({(big - one) / (args.n - 1):.1f} KiB per instance); {args.n} units of one"
            f" {many / 1024:.1f} MiB ({(many - one) / (args.n - 1):.1f} KiB per instance)"
        )


if __name__ == "__main__":
    main()
