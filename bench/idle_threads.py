"""What an idle kernel's threads wake for (not part of ``nox -s bench``).

``python bench/idle_threads.py [--window 20] [--instances 1]`` starts ``hsu
run`` with one ``managed`` unit of ``sleep`` instances, waits for them, then
prints, per thread of the kernel (its ``comm``), the on-CPU time
(``/proc/PID/task/TID/schedstat``) and the voluntary context switches (each
one a wake-up) over an idle window, and the total. ``bench/footprint.py``
compares the total with supervisor and circus; this finds which thread it is.
The kernel is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def threads(pid: int) -> dict[str, tuple[str, int, int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            comm = Path(f"{base}/comm").read_text().strip()
            cpu = int(Path(f"{base}/schedstat").read_text().split()[0])
            status = Path(f"{base}/status").read_text().splitlines()
        except OSError:
            continue
        wakes = next(int(x.split()[1]) for x in status if x.startswith("voluntary_ctxt"))
        out[tid] = (comm, cpu, wakes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--instances", type=int, default=1)
    args = ap.parse_args()
    hsu = Path(sys.executable).parent / "hsu"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "d.yaml").write_text(
            "name: idle\nunits:\n  s:\n    kind: managed\n    command: [sleep, '1e6']\n"
            f"    start: at-start\n    min_instances: {args.instances}\n"
            f"    max_instances: {args.instances}\n"
        )
        proc = subprocess.Popen(
            [str(hsu), "run", "d.yaml", "--control", f"unix:{tmp}/c.sock",
             "--address", f"unix:{tmp}/d.sock"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(600):  # bounded: 60 s
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                if len(kids) >= args.instances:
                    break
                time.sleep(0.1)
            time.sleep(3.0)
            before = threads(proc.pid)
            time.sleep(args.window)
            after = threads(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    total_cpu = total_wakes = 0
    print(f"kernel threads over {args.window:g} s idle, {args.instances} instance(s):")
    for tid, (comm, cpu, wakes) in sorted(after.items(), key=lambda kv: int(kv[0])):
        if tid not in before:
            continue
        d_cpu, d_wakes = cpu - before[tid][1], wakes - before[tid][2]
        total_cpu += d_cpu
        total_wakes += d_wakes
        print(f"  {comm:<18} {d_cpu / 1e6:7.2f} ms  {d_wakes:4d} wake-ups")
    print(f"  {'total':<18} {total_cpu / 1e6:7.2f} ms  {total_wakes:4d} wake-ups")


if __name__ == "__main__":
    main()
