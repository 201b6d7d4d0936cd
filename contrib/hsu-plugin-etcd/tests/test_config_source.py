"""The ``etcd`` config source with real ``hsu run`` kernels: an overlay kept
in etcd adds to each kernel's deployment file, and a change to it reloads
every kernel (the difference only), the reload naming the etcd revision."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hsu_plugin_etcd.cluster import LocalCluster
from hsu_plugin_etcd.config_source import EtcdConfigSource

from hsu.errors import ConfigError
from hsu.ports import SourceContext

from .test_leadership import Kernel, until

ECHO = {"command": ["python", "-m", "hsu_echo"], "interfaces": ["hsu.echo.v1.Echo"]}
PREFIX = "/hsu/test/config"


def units_running(unit: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("HSU_UNIT") == unit:
                found.append(p.pid)
    return found


def put(cluster: LocalCluster, key: str, doc: dict[str, Any]) -> int:
    out = cluster.etcdctl("put", f"{PREFIX}/{key}", json.dumps(doc), "-w", "json")
    return int(json.loads(out)["header"]["revision"])


def test_a_change_in_etcd_reloads_every_kernel_with_the_revision(
    etcd_cluster: LocalCluster, tmp_path: Path
) -> None:
    put(etcd_cluster, "00-units", {"units": {"one": {**ECHO, "start": "at-start"}}})
    env = {
        "HSU_PLUGINS": "etcd",
        "HSU_ETCD_ENDPOINTS": ",".join(etcd_cluster.endpoints),
        "HSU_ETCD_CONFIG": PREFIX,
    }
    kernels = []
    try:
        for name in ("a", "b"):
            k = Kernel(name, etcd_cluster, tmp_path, env=env, units={}, watch_config=True)
            kernels.append(k)
        for k in kernels:
            k.wait_ready()
        until(lambda: len(units_running("one")) == 2, "each kernel runs unit one")
        first = set(units_running("one"))
        # add a unit through etcd: both kernels start it, and leave unit one be
        rev = put(etcd_cluster, "10-more", {"units": {"two": {**ECHO, "start": "at-start"}}})
        until(lambda: len(units_running("two")) == 2, "each kernel runs unit two")
        assert set(units_running("one")) == first  # the difference only
        for k in kernels:
            until(
                lambda k=k: f"etcd revision {rev}" in k.log_text(),
                f"kernel {k.name} logs the reload with revision {rev}",
            )
            [line] = [x for x in k.log_text().splitlines() if f"etcd revision {rev})" in x]
            assert "reload: " in line and "two" in line, line
    finally:
        for k in kernels:
            k.stop()
        for pid in units_running("one") + units_running("two"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_bad_document_in_etcd_is_an_error_naming_the_key_and_revision(
    etcd_cluster: LocalCluster,
) -> None:
    etcd_cluster.etcdctl("put", f"{PREFIX}/bad", "units: [unclosed")
    ctx = SourceContext(
        env={"HSU_ETCD_ENDPOINTS": ",".join(etcd_cluster.endpoints), "HSU_ETCD_CONFIG": PREFIX}
    )
    with pytest.raises(ConfigError, match=rf"etcd {PREFIX}/bad@\d+:\d+: not valid YAML"):
        EtcdConfigSource().load(ctx)


def test_etcd_out_of_reach_is_an_error_naming_where(tmp_path: Path) -> None:
    from hsu_plugin_etcd.cluster import free_port

    port = free_port()
    ctx = SourceContext(env={"HSU_ETCD_ENDPOINTS": f"127.0.0.1:{port}", "HSU_ETCD_CONFIG": PREFIX})
    with pytest.raises(ConfigError, match=rf"etcd {PREFIX}/ at 127.0.0.1:{port}: cannot read"):
        EtcdConfigSource().load(ctx)
