"""The event bus: topics from the kernel, plugins and HSUs; WatchEvents and
``hsu events`` filtered by topic; a slow subscriber told how many it lost."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest

import hsu
from conftest import HSU, ROOT, hsu_env, until, write_deployment
from hsu._kernel.events import EventBus
from hsu.errors import InvalidValue
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc
from hsu.ports import Event, ProbeResult
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
PUBLISHER = str(Path(__file__).with_name("hsu_publisher.py"))


def unit(command: list[str] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "command": command or [sys.executable, "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "startup_timeout": 20,
        "stop_grace": 5,
        **more,
    }


async def collect(stream: Any, into: list[Any]) -> None:
    async for item in stream:
        into.append(item)


# -- the bus itself ----------------------------------------------------------------


async def test_a_subscriber_gets_only_the_topics_it_names() -> None:
    bus = EventBus()
    got: list[Event | int] = []
    task = asyncio.ensure_future(collect(bus.subscribe(topics=("worker.*", "orders.shipped")), got))
    await asyncio.sleep(0)
    bus.publish("instance", to_state="ready", unit="u")
    bus.publish("worker", topic="worker.started", unit="u")
    bus.publish("plugin", topic="orders.shipped", data={"id": "7"})
    bus.publish("plugin", topic="orders.shipped.late")
    bus.publish("worker", topic="worker.stopped", unit="u")
    await until(lambda: len(got) >= 3)
    task.cancel()
    assert [e.topic for e in got if isinstance(e, Event)] == [
        "worker.started",
        "orders.shipped",
        "worker.stopped",
    ]
    assert got[1].data == {"id": "7"}  # type: ignore[union-attr]


async def test_a_slow_subscriber_is_told_how_many_events_it_lost() -> None:
    bus = EventBus(recent=10, backlog=16)
    stream = bus.subscribe(topics=("t.*",)).__aiter__()
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    bus.publish("plugin", topic="t.first")
    assert (await first).topic == "t.first"  # type: ignore[union-attr]
    for i in range(40):  # the reader does not read: it falls 40 behind a ring of 16
        bus.publish("plugin", topic=f"t.n{i}")
    lost = await stream.__anext__()
    assert lost == 40 - 16
    rest = [await stream.__anext__() for _ in range(16)]
    assert [e.topic for e in rest] == [f"t.n{i}" for i in range(24, 40)]  # type: ignore[union-attr]
    await stream.aclose()  # type: ignore[attr-defined]


# -- plugins -----------------------------------------------------------------------


async def test_plugins_publish_and_subscribe_and_the_kernel_publishes_its_topics(
    hsu_kernel_factory, tmp_path: Path
) -> None:
    kernel = await hsu_kernel_factory({"units": {"echo": unit()}})
    got: list[Event | int] = []
    watcher = asyncio.ensure_future(
        collect(kernel.subscribe("worker.*", "service.registered", "config.*", "billing.*"), got)
    )
    await asyncio.sleep(0)
    async with hsu.connect(kernel.control_address) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="hi"), timeout=30
        )
    sent = kernel.publish("billing.invoiced", data={"amount": "12"}, reason="monthly")
    assert sent.kind == "plugin"
    with pytest.raises(InvalidValue, match="the kernel's own"):
        kernel.publish("worker.started")
    assert kernel.publish("limits", reason="a plugin's").kind == "plugin"
    with pytest.raises(InvalidValue, match="topic"):
        kernel.publish("Bad Topic")
    with pytest.raises(InvalidValue, match="longer than 128"):
        kernel.publish("a" * 129)
    with pytest.raises(InvalidValue, match="at most 32"):
        kernel.publish("billing.big", data={f"k{i}": "v" for i in range(33)})
    await kernel.scale("echo", 0)
    await kernel.reload(
        hsu.deployment_from_dict(
            {"units": {"echo": unit(), "more": unit(command=[sys.executable, "-m", "hsu_echo"])}},
            base_dir=str(tmp_path),
        )
    )

    def topics() -> list[str]:
        return [e.topic for e in got if isinstance(e, Event)]

    await until(lambda: "config.changed" in topics())
    watcher.cancel()
    events = [e for e in got if isinstance(e, Event)]
    assert topics() == [
        "service.registered",
        "worker.started",
        "billing.invoiced",
        "worker.stopped",
        "config.changed",
    ]
    registered, started, billing, stopped, changed = events
    assert registered.instance_id == started.instance_id == reply.instance_id
    assert registered.data["interfaces"] == ECHO and registered.data["address"]
    assert started.pid == reply.pid and started.to_state == "ready"
    assert billing.data == {"amount": "12"} and billing.reason == "monthly"
    assert stopped.instance_id == reply.instance_id and stopped.to_state == "stopped"
    assert changed.data == {"added": "more"}


@attrs.frozen
class NoOptions:
    pass


class Switch:
    """A probe that answers what the test says (a real probe plugin)."""

    options = NoOptions

    def __init__(self) -> None:
        self.healthy = True

    async def check(self, target: Any, timeout: float) -> ProbeResult:
        return ProbeResult(self.healthy, "" if self.healthy else "switched off by the test")

    @hsu.hookimpl
    def hsu_register_probes(self, register: Any) -> None:
        register("switch", self)


async def test_an_unhealthy_instance_publishes_worker_unhealthy(hsu_kernel_factory) -> None:
    switch = Switch()
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "echo": unit(
                    min_instances=1,
                    health={"probe": "switch", "interval": 0.1, "failure_threshold": 2},
                )
            }
        },
        plugins=[switch],
    )
    got: list[Event | int] = []
    watcher = asyncio.ensure_future(collect(kernel.subscribe("worker.*", replay=True), got))
    await until(lambda: any(getattr(e, "topic", "") == "worker.started" for e in got), 30)
    switch.healthy = False
    await until(lambda: any(getattr(e, "topic", "") == "worker.unhealthy" for e in got), 30)
    switch.healthy = True
    watcher.cancel()
    [event] = [e for e in got if isinstance(e, Event) and e.topic == "worker.unhealthy"]
    assert event.unit == "echo" and event.kind == "worker"
    assert "2 switch probes failed" in event.reason and "switched off" in event.reason


# -- HSUs over the Kernel API ------------------------------------------------------


async def watch(
    kernel: hsu.Kernel, topics: list[str], into: list[Any], metadata: Any = None
) -> Any:
    channel = grpc.aio.insecure_channel(kernel.control_address)
    call = kernel_pb2_grpc.KernelStub(channel).WatchEvents(
        kernel_pb2.WatchEventsRequest(topics=topics), metadata=metadata
    )

    async def read() -> None:
        async for ev in call:
            into.append(ev)

    return channel, asyncio.ensure_future(read())


async def test_an_hsu_publishes_its_own_topics_and_watchers_filter_them(
    hsu_kernel_factory,
) -> None:
    kernel = await hsu_kernel_factory({"units": {"pub": unit([sys.executable, PUBLISHER])}})
    got: list[kernel_pb2.Event] = []
    channel, reader = await watch(kernel, ["orders.*"], got)
    try:
        async with hsu.connect(kernel.control_address) as routed:
            echo = echo_pb2_grpc.EchoStub(routed)

            async def publish(topic: str) -> str:
                reply = await echo.Echo(echo_pb2.EchoRequest(message=topic), timeout=30)
                return str(reply.message)

            first = await publish("orders.shipped")
            assert first.startswith("seq ")
            own = await publish("worker.started")
            assert "PERMISSION_DENIED" in own and "the kernel's own" in own
            # the built-in limits watcher's topic: a plugin may, an HSU may not
            limits = await publish("limits")
            assert "PERMISSION_DENIED" in limits
            bad = await publish("orders shipped")
            assert "INVALID_ARGUMENT" in bad and "topic" in bad
            long = await publish("o" * 200)
            assert "INVALID_ARGUMENT" in long and "longer than 128" in long
            await publish("other.thing")  # not asked for by this watcher
            await publish("orders.lost")
        await until(lambda: len(got) >= 2)
        [inst] = kernel.instances.values()
        assert [e.topic for e in got] == ["orders.shipped", "orders.lost"]
        assert got[0].seq == int(first.split()[1])
        assert got[0].kind == "hsu" and got[0].instance_id == inst.instance_id
        assert got[0].unit == "pub" and dict(got[0].data) == {"from": "publisher"}
        assert got[0].reason == "asked by a test"
    finally:
        reader.cancel()
        await channel.close()


async def test_publish_event_needs_the_instances_token(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory({"units": {"echo": unit(min_instances=1)}})
    await until(
        lambda: any(i.state is hsu.InstanceState.READY for i in kernel.instances.values()), 30
    )
    [inst] = kernel.instances.values()
    async with grpc.aio.insecure_channel(kernel.control_address) as channel:
        stub = kernel_pb2_grpc.KernelStub(channel)
        request = kernel_pb2.PublishEventRequest(instance_id=inst.instance_id, topic="a.b")
        for metadata in (None, (("hsu-instance-token", "wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.PublishEvent(request, metadata=metadata, timeout=10)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "hsu-instance-token is missing or wrong" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.WatchEvents(kernel_pb2.WatchEventsRequest(topics=["Not A Topic"])).read()
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_with_auth_on_an_hsu_publishes_with_its_token_and_a_caller_without_is_refused(
    hsu_kernel_factory,
) -> None:
    import secrets

    admin = secrets.token_urlsafe(24)
    kernel = await hsu_kernel_factory(
        {
            "auth": {"authenticators": ["token"], "authorizers": ["rbac"]},
            "token": {
                "tokens": [{"identity": "admin", "token": admin, "roles": ["read", "route"]}]
            },
            "units": {"pub": unit([sys.executable, PUBLISHER])},
        }
    )
    bearer = (("authorization", f"Bearer {admin}"),)
    got: list[kernel_pb2.Event] = []
    channel, reader = await watch(kernel, ["orders.*"], got, bearer)
    try:
        async with hsu.connect(kernel.control_address, token=admin) as routed:
            reply = await echo_pb2_grpc.EchoStub(routed).Echo(
                echo_pb2.EchoRequest(message="orders.paid"), timeout=30
            )
        assert reply.message.startswith("seq "), reply.message
        await until(lambda: len(got) >= 1)
        assert got[0].topic == "orders.paid"
        [inst] = kernel.instances.values()
        # the reader's token holds no role that may publish
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await kernel_pb2_grpc.KernelStub(channel).PublishEvent(
                kernel_pb2.PublishEventRequest(instance_id=inst.instance_id, topic="orders.fake"),
                metadata=bearer,
                timeout=10,
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "register" in (refused.value.details() or "")
    finally:
        reader.cancel()
        await channel.close()


# -- the CLI -------------------------------------------------------------------------


def test_hsu_events_topic_shows_only_those_topics(tmp_path: Path, kernel_process) -> None:
    deployment = write_deployment(
        tmp_path / "ev.yaml",
        f"""
units:
  echo:
    command: [{sys.executable}, -m, hsu_echo]
    interfaces: [{ECHO}]
    min_instances: 1
""",
    )
    kernel = kernel_process(deployment)
    kernel.wait_ready()
    out = tmp_path / "events.out"
    with out.open("w") as sink:
        watcher = subprocess.Popen(
            [
                *HSU,
                "events",
                "--topic",
                "worker.*",
                "--replay",
                "--json",
                "--address",
                kernel.address,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=hsu_env(),
        )
    try:
        from conftest import wait_until

        def lines() -> list[dict[str, Any]]:
            return [
                json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")
            ]

        wait_until(lambda: any(e.get("topic") == "worker.started" for e in lines()), 30)
        events = lines()
        assert {e["topic"] for e in events} == {"worker.started"}
        assert events[0]["unit"] == "echo" and events[0]["kind"] == "worker"
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(10)
