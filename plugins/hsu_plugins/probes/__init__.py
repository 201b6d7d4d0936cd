"""Built-in health probes: grpc, ping, tcp, http, exec, process.

A unit picks one with ``health: {probe: NAME, options: {...}}``; the kernel
structures the options into the probe's attrs class (its ``options``). Every
probe returns within the timeout it is given and reports an unhealthy
instance as ``ProbeResult(False, why)``, never by raising. ``docs/probes.md``
describes each probe and its options.

One module per probe kind: adding one is adding a module here and a line to
:func:`hsu_register_probes`.
"""

from __future__ import annotations

import hsu
from hsu.ports import Probe, Register
from hsu_plugins.probes.exec import ExecProbe
from hsu_plugins.probes.grpc import GrpcHealthProbe
from hsu_plugins.probes.http import HttpProbe
from hsu_plugins.probes.ping import PingProbe
from hsu_plugins.probes.process import ProcessProbe
from hsu_plugins.probes.tcp import TcpProbe


@hsu.hookimpl
def hsu_register_probes(register: Register[Probe]) -> None:
    register("grpc", GrpcHealthProbe(), default=True)
    register("ping", PingProbe())
    register("tcp", TcpProbe())
    register("http", HttpProbe())
    register("exec", ExecProbe())
    register("process", ProcessProbe())
