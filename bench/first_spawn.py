"""A kernel's start, from its exec to its first (or Nth) instance spawn.

``python bench/first_spawn.py --rounds 12 --base DIR [--upto 10]`` runs
``hsu run`` of one unit of ten ``managed`` ``sleep 1e6`` in a fresh process,
this checkout and the one in DIR (its ``kernel/``, ``plugins/`` and
``contrib/*/`` first on ``PYTHONPATH``) in every round, alternating. The
process stops itself once the launcher has spawned its Nth ``sleep``
(``subprocess.Popen`` wrapped): it prints the wall time since its exec
(``/proc``, clock ticks) and its CPU time (every thread), kills the sleeps
it spawned, by their Popen, and exits. No stop, no 1 s wait: a round takes
well under a second, so more rounds fit in a quiet moment than
``bench/launch_scale.py`` gets. The CPU time is the steadier figure on a
shared machine; the per-round difference is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from launch_scale import config  # noqa: E402

#: runs in the measured process: ``hsu run`` until the Nth sleep is spawned
SCRIPT = r"""
import os, subprocess, sys, time
upto, spawned = int(sys.argv[1]), []
real = subprocess.Popen.__init__

def init(self, *args, **kwargs):
    real(self, *args, **kwargs)
    argv = args[0] if args else kwargs.get("args")
    if not any("sleep" in str(a) for a in argv):
        return
    spawned.append(self)
    if len(spawned) < upto:
        return
    cpu = time.process_time()
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        wall = float(f.read().split()[0]) - start
    print("FIRST_SPAWN", wall, cpu, flush=True)
    for proc in spawned:
        proc.kill()
        proc.wait()
    os._exit(0)

subprocess.Popen.__init__ = init
from hsu._kernel.cli import main
sys.exit(main(["run", "deployment.yaml", "--control", sys.argv[2]]))
"""


def one(upto: int, base: Path | None) -> tuple[float, float]:
    d = Path(tempfile.mkdtemp(prefix="hsu-first-spawn-"))
    try:
        (d / "deployment.yaml").write_text(config(10, 1))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        if base is not None:
            contrib = sorted(str(p) for p in (base / "contrib").glob("*") if p.is_dir())
            env["PYTHONPATH"] = ":".join([str(base / "kernel"), str(base / "plugins"), *contrib])
        argv = [sys.executable, "-c", SCRIPT, str(upto), f"unix:{d}/control.sock"]
        out = subprocess.run(argv, cwd=d, env=env, capture_output=True, text=True, timeout=120)
        for line in out.stdout.splitlines():
            if line.startswith("FIRST_SPAWN "):
                wall, cpu = line.split()[1:]
                return float(wall), float(cpu)
        raise RuntimeError(f"no spawn: {out.stderr[-2000:]}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--base", type=Path, help="a checkout to compare with (before)")
    ap.add_argument("--upto", type=int, default=1, help="stop at this spawn (1-10)")
    args = ap.parse_args()
    variants: list[tuple[str, Path | None]] = [("this", None)]
    if args.base is not None:
        variants.insert(0, ("base", args.base.resolve()))
    got: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    print(f"load average before: {os.getloadavg()}", flush=True)
    for r in range(args.rounds):
        for name, base in variants if r % 2 == 0 else variants[::-1]:
            got[name].append(one(args.upto, base))
            wall, cpu = got[name][-1]
            print(f"round {r + 1} {name:5} wall {wall * 1000:5.0f} ms  cpu {cpu * 1000:5.0f} ms",
                  flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()}")
    print(f"\nmedians, exec -> spawn {args.upto} of 10:")
    for name, _ in variants:
        walls, cpus = [g[0] for g in got[name]], [g[1] for g in got[name]]
        print(f"  {name:5} wall {statistics.median(walls) * 1000:5.0f} ms"
              f"  cpu {statistics.median(cpus) * 1000:5.0f} ms")  # fmt: skip
    if args.base is not None:
        less = [b[1] - t[1] for b, t in zip(got["base"], got["this"], strict=True)]
        print(f"  cpu base - this, per round: median {statistics.median(less) * 1000:.0f} ms,"
              f" this lower in {sum(x > 0 for x in less)} of {len(less)}")  # fmt: skip


if __name__ == "__main__":
    main()
