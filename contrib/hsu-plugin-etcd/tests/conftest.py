"""A real 3-member etcd cluster on loopback ports, its data in tmp_path,
started and stopped by pid. With HSU_REQUIRE_ETCD set, a missing etcd fails
the test instead of skipping it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
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
