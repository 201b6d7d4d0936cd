"""CPU and wake-ups of the log follower (``hsu._kernel.supervision.logfiles``), not part of
``nox -s bench``.

``python bench/logfollower_idle.py`` follows 100 files (50 instances) in a
running event loop and prints: 10 s idle; 1000 one-line writes 5 ms apart by
another process; 10 lines 1 s apart. CPU is ``time.process_time()``,
wake-ups are ``voluntary_ctxt_switches`` from ``/proc/self/status``.

``--module FILE`` loads ``LogFiles`` from another copy of the module, e.g. the
poll loop it replaced: ``git show 6cc503c~1:kernel/hsu/logfiles.py > /tmp/old.py``
then ``--module /tmp/old.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from typing import Any

from loguru import logger


def load(module: str | None) -> Any:
    if module is None:
        from hsu._kernel.supervision.logfiles import LogFiles

        return LogFiles
    spec = importlib.util.spec_from_file_location("other_logfiles", module)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["other_logfiles"] = mod
    spec.loader.exec_module(mod)
    return mod.LogFiles


def wakeups() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


def writer(fd: int, n: int, pause: float, first_pause: bool) -> subprocess.Popen[bytes]:
    code = (
        "import os, time\n"
        f"for i in range({n}):\n"
        + (f"    time.sleep({pause})\n" if first_pause else "")
        + f"    os.write({fd}, b'a line\\n')\n"
        + ("" if first_pause else f"    time.sleep({pause})\n")
    )
    return subprocess.Popen([sys.executable, "-c", code], pass_fds=[fd])


async def main(cls: Any) -> None:
    lf = cls(tempfile.mkdtemp())
    fds: list[int] = []
    for i in range(50):
        fds += lf.open_for_child("u", str(i))
        lf.follow("u", str(i), 1)
    task = asyncio.create_task(lf.run())
    await asyncio.sleep(1)
    c0, t0 = wakeups(), time.process_time()
    await asyncio.sleep(10)
    c1, t1 = wakeups(), time.process_time()
    print(f"idle 10 s, 100 files: CPU {(t1 - t0) * 1e3:.2f} ms, wake-ups {c1 - c0}")
    n = 1000
    w = writer(fds[0], n, 0.005, first_pause=False)
    t0 = time.process_time()
    while w.poll() is None:  # noqa: ASYNC110 - a child process, not an event
        await asyncio.sleep(0.5)  # this loop's own wake-ups: ~2 a second
    await asyncio.sleep(0.3)
    t1 = time.process_time()
    print(f"{n} writes 5 ms apart: {(t1 - t0) / n * 1e6:.1f} us of CPU per write")
    w = writer(fds[2], 10, 1.0, first_pause=True)
    c0, t0 = wakeups(), time.process_time()
    await asyncio.sleep(10.5)
    c1, t1 = wakeups(), time.process_time()
    w.wait()
    print(f"10 lines 1 s apart, 10.5 s: CPU {(t1 - t0) * 1e3:.2f} ms, wake-ups {c1 - c0}")
    task.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", help="a logfiles.py to load LogFiles from instead")
    args = ap.parse_args()
    logger.remove()
    logger.add(lambda m: None, format="{message}")
    asyncio.run(main(load(args.module)))
