"""The tests' etcd cluster itself: a port taken between picking it and
etcd's bind starts the cluster again on new ports, not a failed test."""

from __future__ import annotations

import socket
from pathlib import Path

from hsu_plugin_etcd.cluster import LocalCluster

from .conftest import need_etcd


def test_a_taken_port_starts_a_new_cluster_again_on_new_ports(tmp_path: Path) -> None:
    need_etcd()
    cluster = LocalCluster(tmp_path / "etcd", 3)
    taken = cluster.members[1].peer_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            cluster.start()
            assert cluster.members[1].peer_port != taken
            assert taken not in [m.client_port for m in cluster.members]
            cluster.etcdctl("put", "/hsu-test/k", "v")
            assert cluster.etcdctl("get", "--print-value-only", "/hsu-test/k").strip() == "v"
        finally:
            cluster.stop()
    assert all(m.proc is None for m in cluster.members)
