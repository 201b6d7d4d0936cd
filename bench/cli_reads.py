"""`hsu ping` and `hsu status` with many instances (issue 20), side by side.

    python bench/cli_reads.py --instances 1000 --rounds 10 [--tree before=DIR]
    python bench/cli_reads.py --instances 1 1000 --one-unit --rounds 9 --tree main=DIR

For each N and shape, one unit of N and N units of one (``kind: managed``, every
program ``sleep 1e6``), a kernel runs per code tree: this checkout's, and each
``--tree LABEL=DIR`` (another checkout of hsu, e.g. ``git archive`` of an
older commit: its ``kernel/`` and ``plugins/`` go first on ``PYTHONPATH`` for
its kernel and its CLI). With every kernel up at once, each round runs each
tree's ``python -m hsu ping`` and ``python -m hsu status`` against its own
kernel, the trees' order rotating from round to round. It reports medians of
wall time, of the CLI's CPU time (user + system, steadier than wall on a
shared machine) and of the kernel's CPU time spent answering; and beside them,
timed in the same rounds, the floor: ``python -c pass``, ``import grpc``,
grpc with the generated Kernel and Core stubs (what a call through grpcio
cannot do without), and the CLI's own HTTP/2 client with the generated
messages (what a call to a local kernel imports instead). It also
checks that ``hsu status | head -1`` exits 141 with nothing on stderr.

Every kernel runs in its own temporary directory and is stopped by pid
(SIGTERM, then SIGKILL of its process group) at the end.
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

import grpc
from _common import trees_and_limits

from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

PROGRAM = ["sleep", "1e6"]
FLOOR = {
    "python -c pass": "pass",
    "import grpc": "import grpc",
    "grpc + stubs": "import grpc; from hsu.core.v1 import core_pb2_grpc;"
    " from hsu.kernel.v1 import kernel_pb2_grpc",
    # what the CLI imports instead on a local socket (hsu._kernel.h2unary)
    "h2unary + messages": "from hsu._kernel import h2unary; from hsu.core.v1 import core_pb2;"
    " from hsu.kernel.v1 import kernel_pb2",
}


def deployment(n: int, units: int) -> str:
    per = n // units
    body = "".join(
        f"  s{i}:\n    kind: managed\n    command: [{', '.join(PROGRAM)}]\n"
        f"    start: at-start\n    min_instances: {per}\n    max_instances: {per}\n"
        for i in range(units)
    )
    return f"name: reads\nunits:\n{body}"


def env_for(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's install has bytecode
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "kernel"), str(tree / "plugins")])
    return env


def cpu_of(pid: int) -> float:
    """User + system seconds of a process (its threads included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Kernel:
    def __init__(self, label: str, tree: Path | None, n: int, units: int, root: Path):
        self.label = label
        self.env = env_for(tree)
        self.dir = root / f"{label}-{n}-{units}"
        self.dir.mkdir()
        (self.dir / "deployment.yaml").write_text(deployment(n, units))
        self.control = f"unix:{self.dir}/control.sock"
        self.n = n
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hsu", "run", "deployment.yaml", *self.addresses()],
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "kernel.err", "wb"),  # noqa: SIM115
            start_new_session=True,
        )

    def addresses(self) -> list[str]:
        return ["--address", f"unix:{self.dir}/data.sock", "--control", self.control]

    def ready(self) -> int:
        try:
            with grpc.insecure_channel(self.control) as ch:
                reply = kernel_pb2_grpc.KernelStub(ch).ListInstances(
                    kernel_pb2.ListInstancesRequest(), timeout=10
                )
        except grpc.RpcError:
            return 0
        return sum(1 for i in reply.instances if i.state == "ready")

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "hsu", *args, "--control", self.control]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit code) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0,) and b"Traceback" in err:
        raise SystemExit(f"{argv}: {err.decode()}")
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def head_one(k: Kernel) -> tuple[int, bytes]:
    """``hsu status | head -1``: hsu's exit code and its stderr."""
    proc = subprocess.Popen(
        k.cli("status"), env=k.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(60), err


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f}"


def shape(
    label: str,
    trees: dict[str, Path | None],
    n: int,
    units: int,
    rounds: int,
    root: Path,
    floor: dict[str, list[float]],
) -> list[str]:
    kernels = [Kernel(name, tree, n, units, root) for name, tree in trees.items()]
    out = []
    try:
        t0 = time.monotonic()
        for k in kernels:
            while k.ready() < n:
                if k.proc.poll() is not None:
                    err = (k.dir / "kernel.err").read_text()
                    raise SystemExit(f"{k.label}: kernel exited: {err}")
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"{k.label}: {k.ready()} of {n} ready after 600 s")
                time.sleep(1)
        print(f"{label}: {len(kernels)} kernels with {n} ready in {time.monotonic() - t0:.0f} s",
              flush=True)  # fmt: skip
        for k in kernels:  # warm: bytecode written, the sampler's first CPU sample taken
            run_timed(k.cli("status"), k.env)
        res: dict[str, dict[str, list[float]]] = {
            k.label: {m: [] for m in ("ping", "ping_cpu", "status", "status_cpu", "kernel_cpu")}
            for k in kernels
        }
        for r in range(rounds):
            for name, code in FLOOR.items():  # in the same rounds: the same load
                wall, cpu, _ = run_timed([sys.executable, "-c", code], env_for(None))
                floor[name].append(wall)
                floor[name + " CPU"].append(cpu)
            order = kernels[r % len(kernels) :] + kernels[: r % len(kernels)]
            for k in order:
                wall, cpu, code = run_timed(k.cli("ping"), k.env)
                assert code == 0, code
                res[k.label]["ping"].append(wall)
                res[k.label]["ping_cpu"].append(cpu)
                before = cpu_of(k.proc.pid)
                wall, cpu, code = run_timed(k.cli("status"), k.env)
                res[k.label]["kernel_cpu"].append(cpu_of(k.proc.pid) - before)
                assert code == 0, code
                res[k.label]["status"].append(wall)
                res[k.label]["status_cpu"].append(cpu)
        for k in kernels:
            x = res[k.label]
            code, err = head_one(k)
            out.append(
                f"| {label} | {k.label} | {med(x['ping'])} | {med(x['ping_cpu'])}"
                f" | {med(x['status'])} | {med(x['status_cpu'])} | {med(x['kernel_cpu'])}"
                f" | {code}{' (stderr: ' + err.decode().strip() + ')' if err else ''} |"
            )
            print(out[-1], flush=True)
    finally:
        for k in kernels:
            k.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1000])
    parser.add_argument("--one-unit", action="store_true", help="not N units of one")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR")
    args = parser.parse_args(argv)
    trees = trees_and_limits(args.tree)
    floor: dict[str, list[float]] = {k: [] for name in FLOOR for k in (name, name + " CPU")}
    lines = [
        "| shape | tree | ping wall | ping CPU | status wall | status CPU | kernel CPU"
        " per status | `status \\| head -1` exit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="hsu-cli-reads-") as tmp:
        for n in args.instances:
            lines += shape(f"one unit of {n}", trees, n, 1, args.rounds, Path(tmp), floor)
            if n > 1 and not args.one_unit:
                lines += shape(f"{n} units of one", trees, n, n, args.rounds, Path(tmp), floor)
    print(f"load average at end: {os.getloadavg()}")
    print("\nmedians, ms; floor (wall, CPU): "
          + ", ".join(f"{k} {med(v)}" for k, v in floor.items()))  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
