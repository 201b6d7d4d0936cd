"""Built-in placements (``kernel.placement``): which kernel starts an
instance on demand, when a call finds no instance of its unit on any host.

- ``local-first`` (the default): the kernel the call came to; what a kernel
  does alone, and what keeps a call's first instance next to its caller.
- ``least-loaded``: the kernel with the fewest instances (of every unit) as
  the shared registry lists them; a tie goes to the kernel asking, then by
  name.
"""

from __future__ import annotations

from collections.abc import Sequence

import hsu
from hsu.ports import Node, Placement, Register


class LocalFirst:
    def pick(self, unit: str, nodes: Sequence[Node]) -> str:
        return next((n.name for n in nodes if n.local), nodes[0].name)


class LeastLoaded:
    def pick(self, unit: str, nodes: Sequence[Node]) -> str:
        return min(nodes, key=lambda n: (n.instances, not n.local, n.name)).name


@hsu.hookimpl
def hsu_register_placements(register: Register[Placement]) -> None:
    register("local-first", LocalFirst(), default=True)
    register("least-loaded", LeastLoaded())
