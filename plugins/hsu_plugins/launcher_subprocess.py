"""Default launcher: a local child process in its own process group.

The process is started with fork+exec (never a bare fork of the kernel), in a
new session so a signal to its group reaches everything it started. Each line
it writes goes to the kernel's log, bound to unit, instance, pid and stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

import hsu
from hsu.errors import LaunchError
from hsu.ports import Launcher, LaunchSpec

if TYPE_CHECKING:
    from loguru import Logger

TAIL_LINES = 20


class SubprocessHandle:
    def __init__(self, proc: asyncio.subprocess.Process, spec: LaunchSpec):
        self._proc = proc
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        log = logger.bind(unit=spec.unit, instance=spec.instance_id, pid=proc.pid)
        self._readers = [
            asyncio.ensure_future(self._pump(proc.stdout, log.bind(stream="stdout"))),
            asyncio.ensure_future(self._pump(proc.stderr, log.bind(stream="stderr"))),
        ]

    async def _pump(self, stream: asyncio.StreamReader | None, log: Logger) -> None:
        if stream is None:
            return
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the reader's limit
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            self._tail.append(line)
            log.info("{}", line)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def output_tail(self) -> list[str]:
        return list(self._tail)

    async def wait(self) -> int:
        code = await self._proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    def signal(self, signum: int) -> None:
        if self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)


class SubprocessLauncher:
    async def launch(self, spec: LaunchSpec) -> SubprocessHandle:
        where = f"unit {spec.unit!r}"
        # one stat() before a fork+exec; not worth a thread
        if spec.cwd is not None and not os.path.isdir(spec.cwd):  # noqa: ASYNC240
            raise LaunchError(f"{where}: working directory {spec.cwd!r} does not exist")
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(spec.env),
                cwd=spec.cwd,
                start_new_session=True,
                limit=1 << 20,
            )
        except FileNotFoundError:
            raise LaunchError(
                f"{where}: executable {spec.argv[0]!r} not found (command: {' '.join(spec.argv)})"
            ) from None
        except PermissionError:
            raise LaunchError(f"{where}: {spec.argv[0]!r} is not executable") from None
        except OSError as exc:
            raise LaunchError(f"{where}: cannot start {spec.argv[0]!r}: {exc}") from None
        return SubprocessHandle(proc, spec)


@hsu.hookimpl
def hsu_register_launchers(register: Callable[[str, Launcher], None]) -> None:
    register("subprocess", SubprocessLauncher())
