"""The launch floor for any program built on hsu's required dependencies.

``python bench/launch_floor.py N PROGRAM...`` imports what ``IMPORTS`` names
(hsu's required dependencies, no hsu code), reads the entry points as plugin
discovery must, then starts ``N`` copies of PROGRAM with ``subprocess.Popen``
and waits; on SIGTERM it ends them, by pid, and exits. ``bench/supervision.py``
times it next to ``hsu run``, supervisord and circusd: no config, no plugins,
no kernel, so how fast a daemon with these imports could launch at best.
"""

from __future__ import annotations

import importlib
import signal
import sys
import types

#: hsu's required dependencies, as the kernel imports them
IMPORTS = (
    "asyncio", "importlib.metadata", "attrs", "cattrs", "loguru", "pluggy", "psutil", "yaml",
    "grpc", "grpc.aio",
)  # fmt: skip


def main() -> None:
    count, program = int(sys.argv[1]), sys.argv[2:]
    for name in IMPORTS:
        importlib.import_module(name)
    import subprocess

    sys.modules["importlib.metadata"].entry_points(group="hsu")
    children = [
        subprocess.Popen(program, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        for _ in range(count)
    ]

    def end(signum: int, frame: types.FrameType | None) -> None:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, end)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
