"""Python memory the kernel holds per idle instance (not part of ``nox -s bench``).

``python bench/instance_memory.py`` starts an in-process kernel with one
``managed`` unit running ``sleep``, scales it from 1 to 51 instances and
compares two tracemalloc snapshots: the total difference / 50, and the source
lines that allocate the most per instance. This finds what to trim; the
daemon's RSS per instance, side by side with supervisor and circus, is in
``bench/supervision.py``. The kernel stops (and with it every instance) at the end.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import tracemalloc

from hsu.testing import build_kernel

ADDED = 50


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        unit = {"command": ["sleep", "1000"], "kind": "managed", "start": "at-start",
                "min_instances": 1, "max_instances": ADDED + 10}  # fmt: skip
        kernel = build_kernel({"units": {"s": unit}}, base_dir=tmp)
        await kernel.start()
        try:
            await asyncio.sleep(1)
            gc.collect()
            tracemalloc.start(25)
            before = tracemalloc.take_snapshot()
            await kernel.scale("s", 1 + ADDED)
            await asyncio.sleep(2)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            await kernel.stop()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"Python objects per idle instance: {total / ADDED / 1024:.1f} KiB")
    for s in stats[:15]:
        frame = s.traceback[0]
        print(f"{s.size_diff / ADDED:8.0f} B  {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")


if __name__ == "__main__":
    asyncio.run(main())
