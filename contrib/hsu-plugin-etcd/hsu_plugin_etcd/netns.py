"""Hosts for tests: network namespaces joined by a bridge (``ip netns``,
veth pairs), so kernels run on separate network stacks with addresses of
their own. Needs root. Everything made is named with one random tag and
removed by :meth:`Hosts.remove` (also after a failure).

The bridge holds ``10.{a}.{b}.1/24`` in the caller's namespace; host ``i``
is ``10.{a}.{b}.{10+i}``. :meth:`Hosts.cut` sets a host's link down (a
partition), :meth:`Hosts.mend` up again.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess


def available() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")


class Hosts:
    def __init__(self, count: int) -> None:
        self.tag = f"{random.getrandbits(24):06x}"
        net = random.randrange(1, 250)
        self.prefix = f"10.{random.randrange(100, 250)}.{net}"
        self.bridge = f"hsub{self.tag}"
        self.gateway = f"{self.prefix}.1"
        self.names = [f"hsu-{self.tag}-{i}" for i in range(count)]
        self.addresses = [f"{self.prefix}.{10 + i}" for i in range(count)]
        self._made: list[tuple[str, str]] = []

    def veth(self, i: int) -> str:
        return f"hsv{self.tag}{i}"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            outer, inner = self.veth(i), f"hsi{self.tag}{i}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._made.append(("link", outer))
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("addr", "add", f"{self.addresses[i]}/24", "dev", inner, ns=ns)
            _ip("link", "set", inner, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run on host ``i`` (``ip netns exec`` execs: the pid is argv's)."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def cut(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "down")

    def mend(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "up")

    def remove(self) -> list[str]:
        """Remove everything made, newest first; what could not be removed."""
        left = []
        for kind, name in reversed(self._made):
            try:
                if kind == "netns":
                    _ip("netns", "del", name)
                else:
                    _ip("link", "del", name)
            except RuntimeError as exc:
                if "Cannot find" not in str(exc) and "does not exist" not in str(exc):
                    left.append(str(exc))
        self._made.clear()
        return left

    def exists(self) -> bool:
        """Whether anything of this tag is still there (for the leak check)."""
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return self.tag in links or self.tag in spaces
