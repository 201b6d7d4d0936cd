"""A real 3-member etcd cluster on loopback ports, its data in tmp_path,
started and stopped by pid. With HSU_REQUIRE_ETCD set, a missing etcd fails
the test instead of skipping it. Hosts (network namespaces joined by a
bridge) and an etcd cluster on their bridge, removed also when a test fails;
with HSU_REQUIRE_NETNS set, a machine that cannot make namespaces fails the
test instead of skipping it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hsu_plugin_etcd import netns
from hsu_plugin_etcd.cluster import LocalCluster, etcd_executable


def need_etcd() -> None:
    if etcd_executable() is None:
        if os.environ.get("HSU_REQUIRE_ETCD"):
            pytest.fail("HSU_REQUIRE_ETCD is set but there is no etcd executable")
        pytest.skip("etcd is not installed (Debian: etcd-server)")


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    need_etcd()
    cluster = LocalCluster(tmp_path / "etcd", 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for m in cluster.members:
            assert m.proc is None


@pytest.fixture
def hosts() -> Iterator[netns.Hosts]:
    why = netns.available()
    if why is not None:
        if os.environ.get("HSU_REQUIRE_NETNS"):
            pytest.fail(f"HSU_REQUIRE_NETNS is set but {why}")
        pytest.skip(why)
    made = netns.Hosts(3)
    try:
        made.create()
        yield made
    finally:
        left = made.remove()
        assert not left, left
        assert not made.exists(), f"namespaces or links tagged {made.tag} are left"


@pytest.fixture
def bridge_etcd(hosts: netns.Hosts, tmp_path: Path) -> Iterator[LocalCluster]:
    need_etcd()
    cluster = LocalCluster(tmp_path / "etcd", 3, hosts=[hosts.gateway] * 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
