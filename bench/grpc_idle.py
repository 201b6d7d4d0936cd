"""Idle CPU of a bare ``grpc.aio.server()`` under gRPC's switches (issue 20).

    python bench/grpc_idle.py --window 10 --rounds 3

No hsu code: each variant is a fresh Python that starts one ``grpc.aio``
server on a unix socket, waits 3 s, then counts its threads' on-CPU time
(``/proc/self/task/*/schedstat``) and voluntary context switches (wake-ups)
over the window. The variants run one after another, in the same order each
round: the floor an idle kernel's gRPC threads stand on (docs/benchmarks.md,
"Idle CPU"). Not part of ``nox -s bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "plain": {},
    "-event_engine_callback_cq": {"GRPC_EXPERIMENTS": "-event_engine_callback_cq"},
    "pollset_alternative": {"GRPC_EXPERIMENTS": "pollset_alternative"},
    "-callback_cq,-listener,-client": {
        "GRPC_EXPERIMENTS": "-event_engine_callback_cq,-event_engine_listener,-event_engine_client"
    },
    "poll strategy poll": {"GRPC_POLL_STRATEGY": "poll"},
    "-event_engine_poller": {"GRPC_EXPERIMENTS": "-event_engine_poller"},
    "-ee_for_all_other_endpoints": {"GRPC_EXPERIMENTS": "-event_engine_for_all_other_endpoints"},
    "-use_call_ee_in_cq": {"GRPC_EXPERIMENTS": "-use_call_event_engine_in_completion_queue"},
    "thready_event_engine": {"GRPC_EXPERIMENTS": "thready_event_engine"},
    "-event_engine_fork": {"GRPC_EXPERIMENTS": "-event_engine_fork"},
}

CHILD = """
import asyncio, os, sys, tempfile, grpc

def cpu():
    ns = switches = 0
    for tid in os.listdir("/proc/self/task"):
        ns += int(open(f"/proc/self/task/{tid}/schedstat").read().split()[0])
        for line in open(f"/proc/self/task/{tid}/status"):
            if line.startswith("voluntary_ctxt_switches"):
                switches += int(line.split()[1])
    return ns, switches

async def main(window):
    with tempfile.TemporaryDirectory() as d:
        server = grpc.aio.server()
        server.add_insecure_port(f"unix:{d}/s.sock")
        await server.start()
        await asyncio.sleep(3)
        a = cpu()
        await asyncio.sleep(window)
        b = cpu()
        print((b[0] - a[0]) / 1e6, b[1] - a[1])
        await server.stop(0)

asyncio.run(main(float(sys.argv[1])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=10.0, help="idle window, s")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, env in VARIANTS.items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.window)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=args.window + 60,
                check=True,
            ).stdout.split()
            ms, wakeups = float(out[0]), int(out[1])
            results[name].append((ms, wakeups))
            print(f"round {r + 1} {name:32} {ms:6.2f} ms {wakeups:4d} wake-ups", flush=True)
    print(f"\nmedians of {args.rounds}, per {args.window:g} s idle (range of the rounds):")
    for name, rows in results.items():
        ms = [m for m, _ in rows]
        wk = [w for _, w in rows]
        print(
            f"  {name:32} {statistics.median(ms):6.2f} ms ({min(ms):.2f}-{max(ms):.2f})"
            f"  {statistics.median(wk):5.0f} wake-ups"
        )


if __name__ == "__main__":
    main()
