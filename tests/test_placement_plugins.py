"""Placement plugins (``hsu_register_placements``, ``kernel.placement``): the
built-ins' picks, a third party's placement registered and chosen by name,
and an unknown name refused when the kernel starts. The picks across real
kernels on etcd are in contrib/hsu-plugin-etcd/tests/test_placement_nodes.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

import hsu
from hsu.errors import HsuError
from hsu.ports import Node, Placement
from hsu.testing import build_kernel
from hsu_plugins.routing.placement import LeastLoaded, LocalFirst

NODES = [
    Node("a", ("echo",), instances=3, local=True),
    Node("b", ("echo",), instances=1),
    Node("c", ("echo",), instances=1),
]


def test_local_first_picks_the_kernel_asking() -> None:
    assert LocalFirst().pick("echo", NODES) == "a"


def test_least_loaded_picks_the_fewest_instances_then_the_local_kernel_then_by_name() -> None:
    assert LeastLoaded().pick("echo", NODES) == "b"
    even = [Node("a", instances=1, local=True), Node("b", instances=1)]
    assert LeastLoaded().pick("echo", even) == "a"
    assert LeastLoaded().pick("echo", [Node("c"), Node("b")]) == "b"


class LastByName:
    def pick(self, unit: str, nodes: Sequence[Node]) -> str:
        return max(n.name for n in nodes)


class ThirdParty:
    @hsu.hookimpl
    def hsu_register_placements(self, register):
        register("last-by-name", LastByName())


async def test_a_third_partys_placement_is_chosen_by_name() -> None:
    k = build_kernel({"kernel": {"placement": "last-by-name"}, "units": {}}, plugins=[ThirdParty()])
    assert k.plugins.default("placement") == "local-first"
    placement = k.plugins.placement("last-by-name")
    assert isinstance(placement, Placement)
    assert placement.pick("echo", NODES) == "c"


async def test_an_unknown_placement_fails_the_start_naming_the_known_ones() -> None:
    k = build_kernel(
        {
            "kernel": {"placement": "nearest"},
            "units": {"echo": {"command": ["python", "-m", "hsu_echo"],
                               "interfaces": ["hsu.echo.v1.Echo"]}},
        }
    )  # fmt: skip
    with pytest.raises(HsuError) as info:
        await k.start()
    assert "no placement named 'nearest'" in str(info.value)
    assert "least-loaded" in str(info.value) and "local-first" in str(info.value)
