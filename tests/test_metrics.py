"""Metrics (issue 16): the collector port (``hsu.metrics``), what the kernel
reads at collection time, routed calls counted under go-grpc-prometheus's
names, and the built-in ``prometheus`` exporter, scraped by a real
Prometheus. Real kernels, a real echo HSU, real gRPC and HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from conftest import until
from hsu.errors import PluginError
from hsu.metrics import CallMetrics, Registry
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ECHO = "hsu.echo.v1.Echo"
UNIT = {
    "command": ["python", "-m", "hsu_echo"],
    "interfaces": [ECHO],
    "startup_timeout": 20,
    "stop_grace": 5,
    "restart": {"policy": "never"},
}
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(page: str, name: str, *, gateway: bool = False, **labels: str) -> float | None:
    """The sum of the lines of ``name`` whose labels include ``labels`` (None:
    no such line); ``gateway``: only the kernel's own series (no
    ``hsu_instance`` label: not collected from an HSU)."""
    found = None
    for line in page.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if gateway and "hsu_instance=" in head:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            found = (found or 0.0) + float(value)
    return found


# -- the collector port ----------------------------------------------------------


def test_counters_gauges_and_histograms_collect_by_labels() -> None:
    reg = Registry()
    c = reg.counter("jobs_total", "jobs done", ("kind",))
    c.labels("a").inc()
    c.labels(kind="a").inc(2)
    c.labels("b").inc()
    g = reg.gauge("queue", "queued")
    g.set(5)
    g.dec()
    h = reg.histogram("took_seconds", "how long", ("kind",), buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.labels("a").observe(v)
    reg.add_collector("mine", lambda: [reg.gauge("x", "x").collect()])
    fams = {f.name: f for f in reg.collect()}
    assert {dict(p.labels)["kind"]: p.value for p in fams["jobs_total"].points} == {
        "a": 3.0,
        "b": 1.0,
    }
    assert fams["queue"].points[0].value == 4.0
    (p,) = fams["took_seconds"].points
    assert p.buckets == ((0.1, 1), (1.0, 2), (math.inf, 3))
    assert p.count == 3 and p.value == pytest.approx(5.55)
    assert reg.counter("jobs_total", "again", ("kind",)) is c
    with pytest.raises(ValueError, match="exists as a counter"):
        reg.gauge("jobs_total", "clash")
    with pytest.raises(TypeError, match="expected labels"):
        c.labels("a", "b")
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.counter("2bad", "x")
    with pytest.raises(ValueError, match="only goes up"):
        c.labels("a").inc(-1)


async def test_a_gather_of_some_names_awaits_only_the_sources_that_may_hold_them() -> None:
    from hsu.metrics import Family, Point

    reg = Registry()
    reg.counter("jobs_total", "jobs").inc()
    reg.gauge("queue", "queued").set(2)
    reg.add_collector("kernel", lambda: [Family("k_state", "gauge", "", (Point((), 1.0),))])
    asked: list[str] = []

    async def usage() -> list[Family]:
        asked.append("usage")
        return [Family("u_rss", "gauge", "", (Point((), 5.0),))]

    async def others(names: frozenset[str] | None) -> list[Family]:
        asked.append(f"others {sorted(names) if names is not None else None}")
        return [Family("o_mine", "counter", "", (Point((), 3.0),))]

    reg.add_source("usage", usage, families=["u_rss"])
    reg.add_source("others", others, filtered=True)
    everything = {f.name for f in await reg.gather()}
    assert everything == {"jobs_total", "queue", "k_state", "u_rss", "o_mine"}
    assert asked == ["usage", "others None"]
    asked.clear()
    some = await reg.gather(["queue", "k_state", "o_mine", "nosuch"])
    assert {f.name for f in some} == {"queue", "k_state", "o_mine"}
    assert asked == ["others ['k_state', 'nosuch', 'o_mine', 'queue']"]  # usage not awaited
    asked.clear()
    assert [f.name for f in await reg.gather(["u_rss"])] == ["u_rss"]
    assert asked == ["usage", "others ['u_rss']"]
    assert [f.name for f in reg.collect(["jobs_total"])] == ["jobs_total"]
    made: list[Any] = []

    def lazy(names: frozenset[str] | None) -> list[Family]:
        made.append(names)
        return [Family(n, "gauge", "", ()) for n in ("l_a", "l_b") if not names or n in names]

    reg.add_collector("lazy", lazy, filtered=True)
    assert {f.name for f in reg.collect(["l_b", "queue"])} == {"l_b", "queue"}
    assert {f.name for f in reg.collect()} >= {"l_a", "l_b"}
    assert made == [frozenset({"l_b", "queue"}), None]


async def test_a_gather_collects_while_its_sources_run() -> None:
    """The kernel's families are made while a slow source (the usage
    sampling thread) runs, not after it."""
    from hsu.metrics import Family, Point

    reg = Registry()
    collected = asyncio.Event()

    def kernel() -> list[Family]:
        collected.set()
        return [Family("k_state", "gauge", "", (Point((), 1.0),))]

    async def usage() -> list[Family]:
        await asyncio.wait_for(collected.wait(), 10)  # never set, if collect came after
        return [Family("u_rss", "gauge", "", (Point((), 5.0),))]

    reg.add_collector("kernel", kernel)
    reg.add_source("usage", usage, families=["u_rss"])
    assert {f.name for f in await reg.gather()} == {"k_state", "u_rss"}


def _families_by_upb(families: list[Any]) -> Any:
    """Core.Metrics's reply built through upb, one add() per point and label:
    what families_wire's bytes must equal."""
    from hsu.core.v1 import core_pb2

    out = core_pb2.MetricsResponse()
    for fam in families:
        add = out.families.add(name=fam.name, kind=fam.kind, help=fam.help).points.add
        for p in fam.points:
            point = add(value=p.value, count=p.count)
            for bound, n in p.buckets:
                point.buckets.add(upper_bound=bound, count=n)
            for k, v in p.labels:
                point.labels.add(name=k, value=v)
    return out


def test_core_metrics_reply_is_written_as_upb_serializes_it() -> None:
    from hsu._kernel.core_service import families_pb, families_wire
    from hsu.metrics import Family, Point

    reg = Registry()
    c = reg.counter("jobs_total", "jobs done", ("unit", "instance"))
    c.labels("s0", "s0-0000abcd").inc(3)
    c.labels("sé", "").inc(0.5)
    reg.gauge("queue", "").set(-0.0)
    h = reg.histogram("took_seconds", "how long", ("unit",), (0.0, 0.1, 1.0))
    for v in (0.05, 0.5, 2.0, 2.0):
        h.labels("s0").observe(v)
    shared = (("hsu_unit", "s0"), ("hsu_instance", "s0-12345678"))
    long = "x" * 300  # a length of two varint bytes
    families = [
        *reg.collect(),
        Family("per_instance", "gauge", "h", (Point(shared, 1.5), Point(shared, 0.0))),
        Family("again", "counter", "", (Point(shared, 2**40), Point((), -1e-300))),
        Family("odd", "gauge", long, (Point(((long, long), ("", "v")), math.inf),)),
        Family("nan", "gauge", "", (Point((), math.nan),)),
        Family("", "", "", ()),
    ]
    expected = _families_by_upb(families)
    assert families_wire(families) == expected.SerializeToString()
    assert families_pb(families[:-2]) == _families_by_upb(families[:-2])  # NaN != NaN


def test_call_metrics_use_go_grpc_prometheus_names_and_codes() -> None:
    reg = Registry()
    calls = CallMetrics(reg, "server")
    t0 = time.perf_counter()
    calls.observe("unary_unary", "/hsu.echo.v1.Echo/Echo", "echo", None, t0)
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), details="no"
    )
    calls.observe("unary_stream", "/hsu.echo.v1.Echo/Count", "echo", err, t0)
    fams = {f.name: f for f in reg.collect()}
    got = {
        tuple(dict(p.labels)[k] for k in ("grpc_type", "grpc_method", "grpc_code")): p.value
        for p in fams["grpc_server_handled_total"].points
    }
    assert got == {("unary", "Echo", "OK"): 1.0, ("server_stream", "Count", "NOT_FOUND"): 1.0}
    services = {dict(p.labels)["grpc_service"] for p in fams["grpc_server_handling_seconds"].points}
    assert services == {ECHO}


# -- the kernel's metrics and the prometheus exporter ------------------------------


def _exporter(kernel: Any) -> Any:
    hub = kernel.metrics_hub
    (exporter,) = [e for n, e in hub._exporters if n == "prometheus"]
    return exporter


async def _page(kernel: Any) -> str:
    status, page = await asyncio.to_thread(_get, f"http://{_exporter(kernel).address}/metrics")
    assert status == 200
    return page


@pytest.mark.integration
async def test_kernel_metrics_on_the_prometheus_page(hsu_kernel_factory: Any) -> None:
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"exporters": ["prometheus"]},
            "prometheus": {"address": "127.0.0.1:0"},
            "units": {"echo": UNIT},
        }
    )
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for i in range(3):
            await stub.Echo(echo_pb2.EchoRequest(message=f"m{i}"), timeout=20)
    page = await _page(kernel)
    assert (
        _sample(
            page,
            "grpc_server_handled_total",
            grpc_service=ECHO,
            grpc_method="Echo",
            grpc_code="OK",
            hsu_unit="echo",
            gateway=True,
        )
        == 3.0
    )
    assert (
        _sample(page, "grpc_server_handling_seconds_count", grpc_method="Echo", gateway=True) == 3.0
    )
    # the echo HSU counted the same calls itself (collected over Core.Metrics)
    assert (
        _sample(page, "grpc_server_handled_total", grpc_method="Echo", hsu_instance="echo-") is None
    )
    (inst,) = kernel.instances.values()
    assert (
        _sample(
            page, "grpc_server_handled_total", grpc_method="Echo", hsu_instance=inst.instance_id
        )
        == 3.0
    )
    assert _sample(page, "hsu_instances", hsu_unit="echo", state="ready") == 1.0
    assert _sample(page, "hsu_instance_start_seconds_count", hsu_unit="echo") == 1.0
    assert (_sample(page, "hsu_instance_resident_memory_bytes", hsu_unit="echo") or 0) > 0
    assert _sample(page, "hsu_breaker_state", state="closed", grpc_service=ECHO) == 1.0
    assert (_sample(page, "hsu_registry_endpoints") or 0) >= 1
    # the kernel process's own metrics
    assert (_sample(page, "process_resident_memory_bytes") or 0) > 0
    # anything but the page's path is refused
    status, _ = await asyncio.to_thread(_get, f"http://{_exporter(kernel).address}/other")
    assert status == 404


@pytest.mark.integration
async def test_a_call_that_fails_is_counted_with_its_code(hsu_kernel_factory: Any) -> None:
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"exporters": ["prometheus"]},
            "prometheus": {"address": "127.0.0.1:0"},
            "units": {"echo": UNIT},
        }
    )
    stub = echo_pb2_grpc.EchoStub(kernel.connect())
    await stub.Echo(echo_pb2.EchoRequest(message="warm"), timeout=20)
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        # the instance answers a method its interface does not have itself
        nope = channel.stream_stream(f"/{ECHO}/Nope")
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                async for _reply in nope(iter([b""]), timeout=20):
                    pass
    # counted with the code the call ended with: the instance's UNIMPLEMENTED
    # (grpc sometimes turns an error that ends a stream before its requests
    # were sent into INTERNAL "Internal error from Core" on the way; not
    # the counting's doing, and the same without metrics)
    fams = {f.name: f for f in kernel.metrics.collect()}
    codes = {
        dict(p.labels)["grpc_code"]: p.value
        for p in fams["grpc_server_handled_total"].points
        if dict(p.labels)["grpc_method"] == "Nope"
    }
    assert sum(codes.values()) == 2.0
    assert set(codes) <= {"UNIMPLEMENTED", "INTERNAL"}
    # hsu.connect in the same process counts as a client
    fams = {f.name: f for f in hsu.metrics.REGISTRY.collect()}
    assert any(
        dict(p.labels)["grpc_method"] == "Echo" and p.value >= 1
        for p in fams["grpc_client_handled_total"].points
    )


@pytest.mark.integration
async def test_metrics_false_counts_no_calls(hsu_kernel_factory: Any) -> None:
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"exporters": ["prometheus"], "metrics": False},
            "prometheus": {"address": "127.0.0.1:0"},
            "units": {"echo": UNIT},
        }
    )
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        await echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="a"), timeout=20)
    page = await _page(kernel)
    # the gateway counted nothing (the HSU counts its own: HSU_METRICS=0 in its env stops it)
    assert _sample(page, "grpc_server_handled_total", gateway=True) is None
    assert _sample(page, "hsu_instances", hsu_unit="echo", state="ready") == 1.0


async def test_an_unknown_exporter_or_a_remote_address_is_refused(
    hsu_kernel_factory: Any,
) -> None:
    with pytest.raises(PluginError, match=r"no exporter named 'statsd' \(registered: prometheus"):
        await hsu_kernel_factory({"kernel": {"exporters": ["statsd"]}, "units": {}})
    with pytest.raises(PluginError, match="reachable from other machines"):
        await hsu_kernel_factory(
            {
                "kernel": {"exporters": ["prometheus"]},
                "prometheus": {"address": "0.0.0.0:0"},
                "units": {},
            }
        )


# -- a real Prometheus -------------------------------------------------------------


def _need_prometheus() -> None:
    if not os.access(PROMETHEUS, os.X_OK):
        if os.environ.get("HSU_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"HSU_REQUIRE_PROMETHEUS=1 but {PROMETHEUS} is not installed")
        pytest.skip("prometheus is not installed (Debian package prometheus)")


class Prometheus:
    """A real Prometheus on loopback scraping ``target`` every second."""

    def __init__(self, tmp: Path, target: str):
        self.port = free_port()
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: hsu\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log = (self.dir / "log").open("w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, q: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            status, body = _get(url)
        except OSError:
            return []
        if status != 200:
            return []
        result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return result

    async def until(self, q: str, check: Any, seconds: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while True:
            result = await asyncio.to_thread(self.query, q)
            if result and check(result):
                return result
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {(self.dir / 'log').read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus: {q} never satisfied; last {result}")
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def _value(result: list[dict[str, Any]]) -> float:
    return sum(float(r["value"][1]) for r in result)


@pytest.mark.integration
async def test_a_real_prometheus_scrapes_calls_and_instance_states(
    hsu_kernel_factory: Any, tmp_path: Path
) -> None:
    _need_prometheus()
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"exporters": ["prometheus"]},
            "prometheus": {"address": f"127.0.0.1:{free_port()}"},
            "units": {"echo": UNIT},
        }
    )
    prom = Prometheus(tmp_path, _exporter(kernel).address)
    try:
        await prom.until('up{job="hsu"}', lambda r: _value(r) == 1.0)
        async with grpc.aio.insecure_channel(kernel.address) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for i in range(5):
                await stub.Echo(echo_pb2.EchoRequest(message=f"m{i}"), timeout=20)
        # the gateway's series (no hsu_instance label) ...
        got = await prom.until(
            'grpc_server_handled_total{grpc_method="Echo",hsu_instance=""}',
            lambda r: _value(r) == 5.0,
        )
        # ... and the HSU's own count of the same calls, from Core.Metrics
        await prom.until(
            'grpc_server_handled_total{grpc_method="Echo",hsu_instance!=""}',
            lambda r: _value(r) == 5.0,
        )
        for series in got:
            labels = series["metric"]
            assert labels["grpc_service"] == ECHO and labels["grpc_code"] == "OK"
            assert labels["hsu_unit"] == "echo"
        # the calls after the gateway learned the method's kind (reflection)
        # are unary; the first may have gone (and be counted) as a stream
        assert "unary" in {s["metric"]["grpc_type"] for s in got}
        await prom.until('hsu_instances{hsu_unit="echo",state="ready"}', lambda r: _value(r) == 1)
        (inst,) = kernel.instances.values()
        os.kill(inst.pid, signal.SIGKILL)
        await until(lambda: inst.state.value == "stopped")
        await prom.until(
            'hsu_instances{hsu_unit="echo",state="stopped"}', lambda r: _value(r) == 1.0
        )
        ready = await asyncio.to_thread(prom.query, 'hsu_instances{hsu_unit="echo",state="ready"}')
        assert _value(ready) == 0.0
    finally:
        await asyncio.to_thread(prom.stop)


async def test_a_plugins_exporter_starts_and_stops_with_the_kernel_and_collects(
    hsu_kernel_factory: Any,
) -> None:
    seen: list[Any] = []

    class Recorder:
        def __init__(self, kernel: Any):
            self.kernel = kernel

        async def start(self) -> None:
            self.kernel.metrics.counter("mine_total", "mine").inc()
            seen.append(("start", {f.name for f in self.kernel.metrics.collect()}))

        async def stop(self) -> None:
            seen.append(("stop", None))

    class Plugin:
        @staticmethod
        @hsu.hookimpl
        def hsu_register_exporters(register: Any) -> None:
            register("recorder", Recorder)

    kernel = await hsu_kernel_factory(
        {"kernel": {"exporters": ["recorder"]}, "units": {}}, plugins=[Plugin]
    )
    assert isinstance(kernel.metrics_hub._exporters[0][1], hsu.ports.Exporter)
    ((what, names),) = seen
    assert what == "start"
    assert {"mine_total", "hsu_instances", "grpc_server_handled_total"} <= names
    await kernel.stop()
    assert seen[-1] == ("stop", None)


# -- HSU metrics, collected over Core ------------------------------------------------

METERED = str(Path(__file__).with_name("hsu_metered.py"))


@pytest.mark.integration
async def test_the_kernel_collects_each_hsus_own_metrics_over_core(
    hsu_kernel_factory: Any,
) -> None:
    kernel = await hsu_kernel_factory(
        {
            "kernel": {"exporters": ["prometheus"]},
            "prometheus": {"address": "127.0.0.1:0"},
            "units": {"metered": {**UNIT, "command": ["python", METERED]}},
        }
    )
    async with grpc.aio.insecure_channel(kernel.address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for m in ("a", "b", "a longer one"):
            await stub.Echo(echo_pb2.EchoRequest(message=m), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Echo(echo_pb2.EchoRequest(message="fail"), timeout=20)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    (inst,) = kernel.instances.values()
    page = await _page(kernel)
    # the author's own metric, labelled with the instance it came from
    mine = dict(hsu_unit="metered", hsu_instance=inst.instance_id)
    assert _sample(page, "echo_messages_total", size="short", **mine) == 2.0
    assert _sample(page, "echo_messages_total", size="long", **mine) == 1.0
    # the SDK's count of the calls it served, beside the gateway's
    assert (
        _sample(page, "grpc_server_handled_total", grpc_code="OK", grpc_method="Echo", **mine)
        == 3.0
    )
    assert (
        _sample(
            page,
            "grpc_server_handled_total",
            grpc_code="FAILED_PRECONDITION",
            grpc_method="Echo",
            **mine,
        )
        == 1.0
    )
    # one family per name: the gateway's series and the HSU's under one TYPE line
    assert page.count("# TYPE grpc_server_handled_total counter") == 1
    # the kernel's Core.Metrics answers the same, over the control plane
    from hsu._kernel.core_service import families_from_pb
    from hsu.core.v1 import core_pb2, core_pb2_grpc

    async with grpc.aio.insecure_channel(kernel.control_address) as control:
        reply = await core_pb2_grpc.CoreStub(control).Metrics(core_pb2.MetricsRequest(), timeout=10)
    names = {f.name for f in families_from_pb(reply)}
    assert {"echo_messages_total", "hsu_instances", "grpc_server_handled_total"} <= names
    # asked for some families, it answers those (an HSU's too, asked of it by name)
    some = ["hsu_instance_resident_memory_bytes", "echo_messages_total", "no_such_family"]
    async with grpc.aio.insecure_channel(kernel.control_address) as control:
        reply = await core_pb2_grpc.CoreStub(control).Metrics(
            core_pb2.MetricsRequest(families=some), timeout=10
        )
    fams = {f.name: f for f in families_from_pb(reply)}
    assert set(fams) == {"hsu_instance_resident_memory_bytes", "echo_messages_total"}
    (rss,) = fams["hsu_instance_resident_memory_bytes"].points
    assert dict(rss.labels)["hsu_instance"] == inst.instance_id and rss.value > 1024 * 1024
    assert {dict(p.labels)["size"] for p in fams["echo_messages_total"].points} == {"short", "long"}
    # the kernel's own families only: its HSUs are not asked
    hub = kernel.metrics_hub
    assert await hub.from_hsus(["hsu_instance_cpu_percent", "hsu_instances"]) == []
    assert {f.name for f in await hub.from_hsus(["echo_messages_total"])} == {"echo_messages_total"}


async def test_the_kernel_lists_the_families_it_answers_itself(hsu_kernel_factory: Any) -> None:
    """KERNEL_FAMILIES (what spares the HSUs a Core.Metrics) names every
    family the kernel makes, and nothing else."""
    from hsu._kernel.metrics import KERNEL_FAMILIES, USAGE_FAMILIES

    kernel = await hsu_kernel_factory({"units": {"echo": {**UNIT, "start": "at-start"}}})
    hub = kernel.metrics_hub
    await until(lambda: any(i.state.value == "ready" for i in kernel.instances.values()), 30)
    made = {f.name for f in hub.collect()} | {f.name for f in await hub.usage()}
    made |= {hub.started.name, hub.cold.name}
    assert {f.name for f in await hub.usage()} == set(USAGE_FAMILIES)
    assert made == KERNEL_FAMILIES


async def test_usage_sampled_at_once_by_concurrent_gathers(hsu_kernel_factory: Any) -> None:
    """A gather that asks for usage starts the sampling before it awaits
    anything; concurrent gathers and a direct usage() each get their
    figures, one sampling at a time, and none is left pending."""
    from hsu._kernel.metrics import USAGE_FAMILIES

    kernel = await hsu_kernel_factory({"units": {"echo": {**UNIT, "start": "at-start"}}})
    hub = kernel.metrics_hub
    await until(lambda: any(i.state.value == "ready" for i in kernel.instances.values()), 30)
    (ready,) = [i for i in kernel.instances.values() if i.state.value == "ready"]
    first = asyncio.ensure_future(hub.gather(list(USAGE_FAMILIES), True))
    rest = [hub.gather(["hsu_instance_resident_memory_bytes"], True), hub.usage()]
    answers = await asyncio.gather(first, *rest)
    for families in answers:
        rss = {f.name: f for f in families}["hsu_instance_resident_memory_bytes"]
        (point,) = rss.points
        assert point.labels == (("hsu_unit", "echo"), ("hsu_instance", ready.instance_id))
        assert point.value > 0
    assert hub._started is None
    assert not hub._sampling.locked()
