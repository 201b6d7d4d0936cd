"""The ``exec`` probe: run a command, healthy iff it exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Sequence
from typing import Any

import attrs

from hsu.ports import ProbeResult, ProbeTarget
from hsu_plugins.probes._common import cut, timed_out

#: how much of the command's output is kept, for the last line in the detail
EXEC_TAIL_BYTES = 4096


def argv(command: str | Sequence[str]) -> list[str]:
    """A string is split as a shell would (``shlex``), but not run by one."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def _command(_: object, attribute: attrs.Attribute[Any], value: str | Sequence[str]) -> None:
    try:
        split = argv(value)
    except ValueError as exc:
        raise ValueError(f"'command' cannot split {value!r}: {exc}") from None
    if not split:
        raise ValueError("'command' must not be empty")


@attrs.frozen
class ExecOptions:
    """``command`` has no default: a unit that names this probe says what to run."""

    #: a string (split as a shell would) or a list of strings
    command: str | tuple[str, ...] = attrs.field(validator=_command)


class ExecProbe:
    """Run a command in its own process group: healthy iff it exits 0.

    On timeout (or cancellation) the whole group is killed and the command is
    reaped before :meth:`check` returns.
    """

    options = ExecOptions

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        args = argv(target.options.command)
        where = f"exec {cut(shlex.join(args))}"
        env = dict(os.environ)
        env.update(
            HSU_UNIT=target.unit,
            HSU_INSTANCE_ID=target.instance_id,
            HSU_INSTANCE_PID=str(target.pid),
            HSU_INSTANCE_ADDRESS=target.address,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError:
            return ProbeResult(False, f"{where}: command not found: {args[0]!r}")
        except OSError as exc:
            return ProbeResult(False, f"{where}: cannot start: {exc}")
        finished = False
        try:
            async with asyncio.timeout(timeout):
                output = await _tail(proc.stdout)
                code = await proc.wait()
            finished = True
        except TimeoutError:
            return ProbeResult(False, f"{where}: {timed_out(timeout)} (killed)")
        finally:
            if not finished:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.shield(proc.wait())
            # A process that left the group may still hold the pipe open; the
            # transport is closed here rather than when that process ends.
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
        last = _last_line(output)
        if code == 0:
            return ProbeResult(True, f"{where}: exit status 0")
        status = f"exit status {code}" if code >= 0 else f"killed by {_signal_name(-code)}"
        return ProbeResult(False, f"{where}: {status}{f': {last}' if last else ''}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return cut(lines[-1]) if lines else ""


async def _tail(stream: asyncio.StreamReader | None) -> bytes:
    """Read ``stream`` to its end, keeping only the last :data:`EXEC_TAIL_BYTES`."""
    if stream is None:
        return b""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-EXEC_TAIL_BYTES:]
    return kept
