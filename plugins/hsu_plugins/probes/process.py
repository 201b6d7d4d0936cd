"""The ``process`` probe: healthy iff the instance's pid exists and is not a zombie."""

from __future__ import annotations

import attrs
import psutil

from hsu.ports import ProbeResult, ProbeTarget


@attrs.frozen
class ProcessOptions:
    """The process probe takes no options."""


class ProcessProbe:
    """Healthy iff the instance's pid exists and is not a zombie."""

    options = ProcessOptions

    def forget(self, target: ProbeTarget) -> None:
        pass

    async def check(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if target.pid <= 0:
            return ProbeResult(False, "process: no pid (the process is not known)")
        where = f"process {target.pid}"
        try:
            status = psutil.Process(target.pid).status()
        except psutil.NoSuchProcess:
            return ProbeResult(False, f"{where}: does not exist")
        except psutil.AccessDenied:
            return ProbeResult(True, f"{where}: exists (status not readable)")
        if status == psutil.STATUS_ZOMBIE:
            return ProbeResult(False, f"{where}: is a zombie (exited, not reaped)")
        return ProbeResult(True, f"{where}: {status}")
