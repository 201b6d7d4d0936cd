"""RSS of a one-instance kernel, this checkout against another one (not part of ``nox -s bench``).

``python bench/start_rss.py --rounds 5 [--base DIR] [--settle 6]`` runs
``hsu run`` of one ``managed`` unit of one ``sleep 1e6`` (a data plane on
``127.0.0.1:0``) and reads the kernel's VmRSS ``--settle`` seconds after its
spawn; then the floor (``bench/launch_floor.py 0``: hsu's required
dependencies imported, nothing started). With ``--base DIR`` (a checkout of
another commit: its ``kernel/``, ``plugins/`` and ``contrib/*/`` first on
``PYTHONPATH``) both kernels run in every round, the order alternating; the
medians are printed side by side. Every kernel is stopped by pid (SIGTERM)
and stops its instance; the run fails if a process it started is left.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import ROOT, RUN_MARK, TRACKER, interrupted, reap_leftovers

DEPLOYMENT = """\
name: rss
kernel:
  address: 127.0.0.1:0
units:
  s0:
    kind: managed
    command: [sleep, 1e6]
    start: at-start
    min_instances: 1
    max_instances: 1
"""


def vmrss(pid: int) -> int:
    """VmRSS in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def one(variant: str, base: Path | None, settle: float) -> int:
    d = Path(tempfile.mkdtemp(prefix=f"hsu-rss-{variant}-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HSU_BENCH_RUN"] = RUN_MARK
    if base is not None:
        contrib = sorted(str(p) for p in (base / "contrib").glob("*") if p.is_dir())
        env["PYTHONPATH"] = ":".join([str(base / "kernel"), str(base / "plugins"), *contrib])
    if variant == "floor":
        argv = [sys.executable, str(ROOT / "bench" / "launch_floor.py"), "0", "sleep", "1e6"]
    else:
        (d / "deployment.yaml").write_text(DEPLOYMENT)
        argv = [sys.executable, "-m", "hsu", "run", "deployment.yaml"]
    out = open(d / "out.txt", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(argv, cwd=d, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    TRACKER.add([proc.pid])
    try:
        time.sleep(settle)
        if proc.poll() is not None:
            raise RuntimeError(f"{variant}: exited {proc.returncode}; see {d}/out.txt")
        TRACKER.add(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
        return vmrss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base", type=Path, help="a checkout to compare with (before)")
    ap.add_argument("--settle", type=float, default=6.0, help="seconds from spawn to the read")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    variants: list[tuple[str, Path | None]] = [("this", None)]
    if args.base is not None:
        variants.insert(0, ("base", args.base.resolve()))
    got: dict[str, list[int]] = {name: [] for name, _ in [*variants, ("floor", None)]}
    failed: BaseException | None = None
    try:
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, base in [*order, ("floor", None)]:
                got[name].append(one(name if name == "floor" else "kernel", base, args.settle))
                print(f"round {r + 1} {name:5} VmRSS {got[name][-1] / 2**20:.1f} MiB", flush=True)
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reap_leftovers(failed)
    print(f"\nmedians of {args.rounds}, VmRSS {args.settle:g} s after the spawn:")
    for name, values in got.items():
        print(f"  {name:5} {statistics.median(values) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
