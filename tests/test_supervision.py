"""Supervision: restart policy, crash-loop breaker, probes, limits, re-attach, CLI."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import psutil

import hsu
from conftest import hsu_env, run_hsu, until, wait_until, write_deployment
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.kernel.v1 import kernel_pb2, kernel_pb2_grpc

S = hsu.InstanceState
SLEEP = ["python", "-c", "import time; time.sleep(600)"]


def managed(command, **more) -> dict:
    return {"command": command, "kind": "managed", "stop_grace": 2, **more}


class Events:
    def __init__(self):
        self.seen = []

    @hsu.hookimpl
    def hsu_instance_event(self, kernel, instance, event):
        self.seen.append((event.unit, event.from_state, event.to_state, event.reason))


# -- restart policy and the breaker ------------------------------------------


async def test_a_crash_loop_trips_the_breaker_and_the_api_keeps_answering(hsu_kernel_factory):
    events = Events()
    crash = managed(
        ["python", "-c", "import sys; sys.exit(2)"],
        start="at-start",
        restart={
            "backoff": {"initial": 0.05, "max": 0.1, "jitter": 0},
            "crash_loop": {"max_failures": 4, "window": 60},
        },
    )
    kernel = await hsu_kernel_factory({"units": {"crash": crash}}, plugins=[events])
    [inst] = kernel.instances.values()
    async with grpc.aio.insecure_channel(kernel.control_address) as ch:
        core = core_pb2_grpc.CoreStub(ch)
        pings = 0
        while inst.state is not S.FATAL:
            # the kernel answers while the loop runs (bounded: the loop is ~4 starts)
            await core.Ping(core_pb2.PingRequest(payload=b"x"), timeout=5)
            pings += 1
            assert pings < 2000, "the breaker never tripped"
            await asyncio.sleep(0.01)
        listing = await kernel_pb2_grpc.KernelStub(ch).ListInstances(
            kernel_pb2.ListInstancesRequest(), timeout=5
        )
    assert inst.machine.history[-1].reason.startswith("crash loop: 4 failures within 60s")
    assert "exited with status 2" in inst.machine.history[-1].reason
    assert listing.instances[0].state == "fatal" and listing.instances[0].restarts == 3
    moves = [(f, t) for u, f, t, _ in events.seen]
    assert moves.count(("starting", "backoff")) + moves.count(("ready", "backoff")) == 3
    assert moves[-1][1] == "fatal"
    # fatal means no more starts: nothing happens while we wait a little
    pid = inst.pid
    await asyncio.sleep(0.3)
    assert inst.state is S.FATAL and inst.pid == pid
    # `hsu start` resets the breaker and tries again
    await kernel.start_unit("crash")
    await until(lambda: inst.state is S.FATAL and inst.restarts > 3)


async def test_the_cooldown_breaker_tries_once_half_open_and_opens_again(hsu_kernel_factory):
    events = Events()
    crash = managed(
        ["python", "-c", "import sys; sys.exit(1)"],
        start="at-start",
        restart={
            "backoff": {"initial": 0.01, "jitter": 0},
            "crash_loop": {"max_failures": 2, "window": 60, "action": "cooldown", "cooldown": 0.2},
        },
    )
    kernel = await hsu_kernel_factory({"units": {"crash": crash}}, plugins=[events])
    [inst] = kernel.instances.values()
    await until(lambda: sum(1 for e in events.seen if e[2] == "fatal") >= 2)
    reasons = [r for _, _, t, r in events.seen if t == "fatal"]
    assert "open for 0.2s" in reasons[0]
    # after the cooldown exactly one start (half-open), whose failure reopens it
    assert "failed again after the cooldown" in reasons[1]
    first, second = (i for i, e in enumerate(events.seen) if e[2] == "fatal")
    between = [e[2] for e in events.seen[first + 1 : second]]
    assert between.count("starting") == 1
    await kernel.stop()
    assert inst.state is S.STOPPED


async def test_restart_never_and_on_failure_with_a_clean_exit_leave_it_stopped(
    hsu_kernel_factory,
):
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "once": managed(["python", "-c", "pass"], start="at-start"),
                "never": managed(
                    ["python", "-c", "import sys; sys.exit(5)"],
                    start="at-start",
                    restart={"policy": "never"},
                ),
            }
        }
    )
    once = next(i for i in kernel.instances.values() if i.unit == "once")
    never = next(i for i in kernel.instances.values() if i.unit == "never")
    await until(lambda: once.state is S.STOPPED and never.state is S.STOPPED)
    assert once.restarts == 0 and "(restart: on-failure)" in once.machine.history[-1].reason
    assert never.restarts == 0 and never.last_exit == "exited with status 5"


async def test_a_missing_executable_names_the_unit_and_the_others_keep_running(
    hsu_kernel_factory,
):
    events = Events()
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "good": managed(SLEEP, start="at-start"),
                "bad": managed(
                    ["no-such-program-hsu", "--flag"],
                    start="at-start",
                    restart={"crash_loop": {"max_failures": 2}, "backoff": {"initial": 0.01}},
                ),
            }
        },
        plugins=[events],
    )
    good = next(i for i in kernel.instances.values() if i.unit == "good")
    bad = next(i for i in kernel.instances.values() if i.unit == "bad")
    await until(lambda: bad.state is S.FATAL)
    assert bad.last_exit == (
        "unit 'bad': executable 'no-such-program-hsu' not found"
        " (command: no-such-program-hsu --flag)"
    )
    assert good.state is S.READY and psutil.Process(good.pid).is_running()
    assert [e for e in events.seen if e[0] == "good"][-1][2] == "ready"


# -- health probes, limits, dependencies, kinds -------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unhealthy_instance_is_replaced(hsu_kernel_factory, tmp_path):
    port = free_port()
    script = tmp_path / "flaky.py"
    # listens, then stops listening but stays alive: only the probe can tell
    script.write_text(
        "import socket, sys, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen()\n"
        "time.sleep(1.0); s.close(); time.sleep(600)\n"
    )
    unit = managed(
        ["python", str(script)],
        start="at-start",
        health={
            "probe": "tcp",
            "interval": 0.1,
            "timeout": 0.5,
            "failure_threshold": 2,
            "options": {"port": port},
        },
    )
    kernel = await hsu_kernel_factory({"units": {"flaky": unit}})
    [inst] = kernel.instances.values()
    assert inst.state is S.READY and inst.health == "healthy"
    first = inst.pid
    await until(lambda: inst.restarts == 1 and inst.state is S.READY)
    assert inst.last_exit.startswith("unhealthy: 2 tcp probes failed; last: ")
    assert inst.pid != first and not psutil.pid_exists(first)


async def test_resource_limits_restart_an_instance_over_its_memory(hsu_kernel_factory):
    hog = ["python", "-c", "import time; b = bytearray(80 * 2**20); time.sleep(600)"]
    unit = managed(
        hog, start="at-start", limits={"rss_mb": 40, "interval": 0.3, "action": "restart"}
    )
    kernel = await hsu_kernel_factory({"units": {"hog": unit}})
    [inst] = kernel.instances.values()
    await until(lambda: inst.restarts >= 1)
    assert inst.machine.history[-3].reason.startswith("resource limits: rss ")


async def test_the_limits_watcher_publishes_each_breach_as_a_plugin_event(hsu_kernel_factory):
    hog = ["python", "-c", "import time; b = bytearray(80 * 2**20); time.sleep(600)"]
    unit = managed(hog, start="at-start", limits={"rss_mb": 40, "interval": 0.3})
    kernel = await hsu_kernel_factory({"units": {"hog": unit}})
    [inst] = kernel.instances.values()
    seen = []

    async def collect() -> None:
        async for ev in kernel.subscribe("limits", replay=True):
            if not isinstance(ev, int):
                seen.append(ev)
                return

    await asyncio.wait_for(collect(), 30)
    [ev] = seen
    assert ev.kind == "plugin" and ev.unit == "hog" and ev.instance_id == inst.instance_id
    assert ev.reason.startswith("rss ") and "> limit 40 MiB" in ev.reason
    assert inst.restarts == 0  # action: log (the default) only tells


async def test_a_third_party_watcher_acts_through_the_public_api(hsu_kernel_factory):
    """A watcher from another plugin: started for the units it wants, it
    samples an instance and stops it, as the built-in idle and limits do."""
    done: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    class Stopper:
        settings: tuple[str, ...] = ()

        def wants(self, unit: str, spec) -> bool:
            return unit == "victim"

        async def watch(self, kernel, unit: str) -> None:
            [inst] = await _ready_of(kernel, unit)
            usage = kernel.usage(inst.instance_id)
            await kernel.stop_instance(inst.instance_id, "stopped by the watcher")
            done.set_result((unit, usage))

    class Plugin:
        @staticmethod
        @hsu.hookimpl
        def hsu_register_watchers(register) -> None:
            register("stopper", Stopper())

    kernel = await hsu_kernel_factory(
        {
            "units": {
                "victim": managed(SLEEP, start="at-start"),
                "other": managed(SLEEP, start="at-start"),
            }
        },
        plugins=[Plugin],
    )
    unit, usage = await asyncio.wait_for(done, 30)
    assert unit == "victim" and usage is not None and usage.rss > 0
    states = {i.unit: i.state.value for i in kernel.instances.values()}
    assert states == {"victim": "stopped", "other": "ready"}
    [victim] = [i for i in kernel.instances.values() if i.unit == "victim"]
    assert any(t.reason == "stopped by the watcher" for t in victim.machine.history)


async def _ready_of(kernel, unit: str) -> list:
    for _ in range(600):
        ready = [i for i in kernel.instances.values() if i.unit == unit and i.state == "ready"]
        if ready:
            return ready
        await asyncio.sleep(0.05)
    raise AssertionError(f"no ready instance of {unit}")


async def test_dependencies_start_first_and_stop_last(hsu_kernel_factory):
    events = Events()
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "app": managed(SLEEP, start="at-start", depends_on=["db"]),
                "db": managed(SLEEP, start="at-start"),
            }
        },
        plugins=[events],
    )
    moves = [(u, t) for u, _, t, _ in events.seen]
    assert moves.index(("db", "ready")) < moves.index(("app", "starting"))
    await kernel.stop()
    moves = [(u, t) for u, _, t, _ in events.seen]
    assert moves.index(("app", "stopped")) < moves.index(("db", "stopping"))


async def test_an_unmanaged_process_is_attached_and_never_killed(hsu_kernel_factory, tmp_path):
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # noqa: ASYNC220
    try:
        (tmp_path / "out.pid").write_text(f"{outsider.pid}\n")
        unit = {"kind": "unmanaged", "pidfile": "out.pid", "start": "at-start"}
        kernel = await hsu_kernel_factory({"units": {"outsider": unit}})
        [inst] = kernel.instances.values()
        assert inst.state is S.READY and inst.pid == outsider.pid
        await kernel.stop()
        assert inst.state is S.STOPPED and outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


# -- the kernel process: re-attach, CLI ---------------------------------------

REATTACH = """\
name: attach
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    start: at-start
    stop_grace: 5
  sleeper:
    command: [python, -c, "import time; time.sleep(600)"]
    kind: managed
    start: at-start
    min_instances: 2
    max_instances: 2
    stop_grace: 2
"""


def listing(address: str) -> list[dict]:
    out = run_hsu("status", "--json", "--address", address)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["instances"]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for pytest, the subreaper, does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != "zombie"}


def test_a_sigkilled_kernel_is_reattached_without_duplicates_or_orphans(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", REATTACH)
    k = kernel_process(path)
    k.wait_ready()
    before = {(i["instance_id"], i["pid"]) for i in listing(k.address)}
    assert len(before) == 3
    k.proc.kill()
    k.proc.wait()
    hsus = {pid for _, pid in before}
    assert hsus <= descendants()  # they outlived the kernel (reattach: true)

    again = kernel_process(path, hsu_env(HSU_LOG_LEVEL="DEBUG"))
    again.wait_ready()
    after = listing(again.address)
    assert {(i["instance_id"], i["pid"]) for i in after} == before
    assert all(i["state"] == "ready" and i.get("reattached") for i in after)
    # no duplicate: the only processes are the kernel and the three HSUs
    assert descendants() - {again.proc.pid} == hsus
    # the re-attached echo still serves, at the address it registered
    echo = next(i for i in after if i["instance_id"].startswith("echo-"))
    with grpc.insecure_channel(echo["address"]) as ch:
        core_pb2_grpc.CoreStub(ch).Ping(core_pb2.PingRequest(), timeout=5)
    # a re-attached instance that dies is restarted like any other
    sleeper = next(i for i in after if i["instance_id"].startswith("sleeper-"))
    os.kill(sleeper["pid"], signal.SIGKILL)
    wait_until(
        lambda: any(
            i["instance_id"] == sleeper["instance_id"]
            and i["state"] == "ready"
            and i["pid"] != sleeper["pid"]
            for i in listing(again.address)
        )
    )
    code, _, err = again.stop()
    assert code == 0, err
    assert not any(alive(p) for p in hsus)  # no orphan
    # the re-attached echo proved itself with the token the state file kept:
    # it was asked to stop over Core.Shutdown, not signalled
    assert "Core.Shutdown failed" not in err


def test_a_unit_removed_while_the_kernel_was_dead_is_stopped_on_restart(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", REATTACH)
    k = kernel_process(path)
    k.wait_ready()
    sleepers = {i["pid"] for i in listing(k.address) if i["unit"] == "sleeper"}
    k.proc.kill()
    k.proc.wait()
    write_deployment(path, REATTACH.split("  sleeper:")[0])
    again = kernel_process(path)
    again.wait_ready()
    assert {i["unit"] for i in listing(again.address)} == {"echo"}
    wait_until(lambda: not any(alive(p) for p in sleepers))
    code, _, err = again.stop()
    assert code == 0, err
    assert "stopping pid" in err and "its unit is gone" in err


def test_reattach_false_means_instances_die_with_the_kernel(kernel_process, tmp_path):
    text = REATTACH.replace("name: attach", "name: attach\nkernel: {reattach: false}")
    path = write_deployment(tmp_path / "d.yaml", text)
    k = kernel_process(path)
    k.wait_ready()
    pids = {i["pid"] for i in listing(k.address)}
    k.proc.kill()
    k.proc.wait()
    wait_until(lambda: not any(alive(p) for p in pids))


CLI = """\
name: cli
units:
  printer:
    command: [python, -u, -c, "import sys, time; print('hello out'); print('hello err', file=sys.stderr); time.sleep(600)"]
    kind: managed
    max_instances: 3
    stop_grace: 2
"""  # noqa: E501


def test_cli_start_scale_restart_stop_logs_and_events(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", CLI)
    k = kernel_process(path)
    k.wait_ready()
    events = subprocess.Popen(
        [sys.executable, "-m", "hsu", "events", "--address", k.address],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        a = ["--address", k.address]
        out = run_hsu("start", "printer", *a)
        assert out.returncode == 0, out.stderr
        assert [
            line.split()[1] for line in out.stdout.splitlines() if not line.startswith("INSTANCE")
        ] == ["ready"]
        out = run_hsu("scale", "printer", "3", *a)
        states = [
            line.split()[1] for line in out.stdout.splitlines() if not line.startswith("INSTANCE")
        ]
        assert out.returncode == 0 and states == ["ready"] * 3, out.stdout
        out = run_hsu("scale", "printer", "4", *a)
        assert out.returncode == 1
        assert "cannot scale to 4: allowed 0..3" in out.stderr
        pids = {i["pid"] for i in listing(k.address)}
        one = listing(k.address)[0]["instance_id"]
        out = run_hsu("restart", one, *a)
        assert out.returncode == 0, out.stderr
        new = {i["pid"] for i in listing(k.address)}
        assert len(pids - new) == 1 and len(new) == 3
        out = run_hsu("logs", "printer", *a)
        assert out.returncode == 0, out.stderr
        assert re.search(r" stdout\]\s+hello out", out.stdout), out.stdout
        assert re.search(r" stderr\]\s+hello err", out.stdout), out.stdout
        log_dir = tmp_path / ".hsu" / "cli" / "logs" / "printer"
        assert (log_dir / f"{one}.stdout.log").read_text().count("hello out") >= 1
        out = run_hsu("stop", "printer", *a)
        states = [
            line.split()[1] for line in out.stdout.splitlines() if not line.startswith("INSTANCE")
        ]
        assert out.returncode == 0 and states == ["stopped"] * 3, out.stdout
        assert not any(psutil.pid_exists(p) for p in new)
        out = run_hsu("stop", "nothing", *a)
        assert out.returncode == 1 and "no unit named 'nothing'" in out.stderr
    finally:
        code, _, err = k.stop()
        events.wait(30)
    assert code == 0, err
    lines = events.stdout.read().splitlines()
    assert any(f"{one}: ready -> stopping" in line for line in lines)
    assert any("stopping -> stopped  (stopped by request)" in line for line in lines) or any(
        "unit printer stopped by request" in line for line in lines
    )


def test_instance_logs_are_files_under_the_state_dir(tmp_path: Path):
    # the default state dir sits next to the deployment, named after it
    from hsu.testing import build_kernel

    kernel = build_kernel({"name": "x", "units": {}}, base_dir=str(tmp_path))
    assert kernel.state_dir == tmp_path / ".hsu" / "x"


async def test_an_idle_instance_above_the_floor_stops_after_idle_timeout(hsu_kernel_factory):
    events = Events()
    unit = {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": ["hsu.echo.v1.Echo"],
        "idle_timeout": 0.3,
        "stop_grace": 5,
    }
    kernel = await hsu_kernel_factory({"units": {"echo": unit}}, plugins=[events])
    inst = await kernel.instance_for("hsu.echo.v1.Echo")
    pid = inst.pid
    await until(lambda: not kernel.instances)
    assert ("echo", "stopping", "stopped", "idle for 0.3s") in events.seen
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # the next call starts a new one on demand
    again = await kernel.instance_for("hsu.echo.v1.Echo")
    assert again.state is S.READY and again.instance_id != inst.instance_id


async def test_rlimits_hold_in_the_child_from_its_start(hsu_kernel_factory, tmp_path):
    show = ["python", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"]
    unit = managed(show, start="at-start", limits={"rlimits": {"nofile": 128}})
    kernel = await hsu_kernel_factory({"units": {"show": unit}})
    [inst] = kernel.instances.values()
    await until(lambda: inst.state is S.STOPPED)
    assert kernel.output_tail(inst) == ["(128, 128)"]


async def test_a_replacement_starts_without_the_dead_pid_and_is_ready_with_its_own(
    hsu_kernel_factory,
):
    seen = []

    class Pids:
        @hsu.hookimpl
        def hsu_instance_event(self, kernel, instance, event):
            seen.append((event.to_state, event.pid))

    kernel = await hsu_kernel_factory(
        {"units": {"s": managed(SLEEP, start="at-start")}}, plugins=[Pids()]
    )
    [inst] = kernel.instances.values()
    first = inst.pid
    seen.clear()
    os.kill(first, signal.SIGKILL)
    await until(lambda: inst.state is S.READY and inst.pid not in (0, first))
    starting = [pid for state, pid in seen if state == "starting"]
    ready = [pid for state, pid in seen if state == "ready"]
    assert starting == [0]  # not the dead one
    assert ready == [inst.pid]


async def test_first_done_wakes_on_any_future_and_close_detaches_it():
    from hsu._kernel.supervision.supervisor import _FirstDone

    loop = asyncio.get_running_loop()
    a, b, c = loop.create_future(), loop.create_future(), loop.create_future()
    first = _FirstDone((a, b, c))
    await asyncio.sleep(0)
    assert not first.waiter.done()
    b.set_result(1)
    async with asyncio.timeout(5):
        await first.waiter
    first.close()
    # closed: a later result neither fails nor reaches it, and nothing is left attached
    a.set_result(2)
    await asyncio.sleep(0)
    assert a.remove_done_callback(first._on_done) == 0
    assert c.remove_done_callback(first._on_done) == 0
    # an already-done future wakes a new one at once
    again = _FirstDone((a, c))
    async with asyncio.timeout(5):
        await again.waiter
    again.close()


async def test_spawn_thread_answers_each_queued_instance_in_order():
    """A launch's file system work goes to the spawn thread as one job: each
    instance gets its own answer (or its error), in the order asked, on the
    spawn thread, and a job asked for after the thread went idle still runs."""
    import threading

    import pytest

    from hsu._kernel.supervision.supervisor import _preparer

    class Unit:
        def __init__(self):
            self.seen = []

        def _prepare(self, instance_id, cgroup):
            self.seen.append((instance_id, threading.current_thread().name))
            if instance_id == "bad":
                raise OSError("no room")
            return f"{instance_id}:{cgroup}"

    unit = Unit()
    names = [f"i{n}" for n in range(50)]
    futs = [_preparer.prepare(unit, name, "cg") for name in names]
    failing = _preparer.prepare(unit, "bad", None)
    async with asyncio.timeout(10):
        assert await asyncio.gather(*futs) == [f"{name}:cg" for name in names]
        with pytest.raises(OSError, match="no room"):
            await failing
        assert [i for i, _ in unit.seen] == [*names, "bad"]
        assert all(t.startswith("hsu-spawn") for _, t in unit.seen)
        assert await _preparer.prepare(unit, "later", None) == "later:None"


async def test_slots_cancelled_before_they_first_run_give_the_collector_back(
    hsu_kernel_factory,
):
    """New slots pause the cyclic collector until their first starts; slots
    whose tasks are cancelled before they ever run (their ``finally`` never
    does) must not leave it paused, nor count as starts still to come (which
    would send every later lone start through the spawn thread)."""
    from hsu._kernel.supervision import supervisor

    unit = managed(["sleep", "600"], min_instances=0, max_instances=5)
    kernel = await hsu_kernel_factory({"units": {"idle": unit}})
    sup = kernel.units["idle"]
    assert gc.isenabled()
    queued = supervisor._queued
    slots = [sup.add_slot() for _ in range(3)]
    assert not gc.isenabled()  # paused while the starts are pending
    assert supervisor._queued == queued + 3
    tasks = [sup._controls[i.instance_id].task for i in slots]
    for t in tasks:
        assert t is not None
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gc.isenabled()
    assert supervisor._queued == queued
    assert not [i for i in kernel.instances.values() if i.pid]
    for inst in slots:  # dropped as remove() would (their tasks are done)
        sup.slots.pop(inst.instance_id)
        sup._controls.pop(inst.instance_id)
        kernel.forget(inst)


async def test_a_launch_sums_its_starts_up_in_one_line_and_logs_each_at_debug(
    hsu_kernel_factory,
):
    """Several first starts at once (a launch): one INFO line for them, each
    instance's pid at DEBUG in the kernel's log buffer; a lone start and a
    restart still log their own INFO line."""
    unit = managed(["sleep", "600"], start="at-start", min_instances=3, max_instances=5)
    kernel = await hsu_kernel_factory({"units": {"many": unit}})
    launched = {i.instance_id: i.pid for i in kernel.instances.values()}
    assert len(launched) == 3 and all(launched.values())

    def started(level: str) -> dict[str, str]:
        return {
            r.extra.get("instance", ""): r.message
            for r in kernel.logs.tail(kernel.logs.maxlen)
            if r.level == level and r.message.startswith("started pid ")
        }

    debug = started("DEBUG")
    for iid, pid in launched.items():
        assert debug[iid] == f"started pid {pid}: sleep 600"
    assert not set(started("INFO")) & set(launched)
    summaries = [
        r.message
        for r in kernel.logs.tail(kernel.logs.maxlen)
        if r.level == "INFO" and "instances" in r.message
    ]
    assert summaries == [
        "unit 'many': started 3 instances: sleep 600 (their pids at debug level: hsu logs many)"
    ]
    assert gc.isenabled()  # paused for the launch only
    # one more: a lone start, at INFO
    await kernel.units["many"].scale(4)
    [new] = [i for i in kernel.instances.values() if i.instance_id not in launched]
    assert started("INFO")[new.instance_id] == f"started pid {new.pid}: sleep 600"
    # a restart, at INFO
    old = kernel.instances[next(iter(launched))]
    first = old.pid
    await kernel.units["many"].restart(old, "test")
    assert old.pid != first
    assert started("INFO")[old.instance_id] == f"started pid {old.pid}: sleep 600"


async def test_a_restarted_instance_does_not_log_its_last_process_output_again(
    hsu_kernel_factory,
):
    say = [
        "python",
        "-c",
        "import os, time; print('hello', os.getpid(), flush=True); time.sleep(600)",
    ]
    kernel = await hsu_kernel_factory({"units": {"say": managed(say, start="at-start")}})
    [inst] = kernel.instances.values()

    def hellos() -> list[tuple[str, str]]:
        return [
            (r.message, r.extra.get("pid", ""))
            for r in kernel.logs.tail(kernel.logs.maxlen)
            if r.message.startswith("hello") and r.extra.get("instance") == inst.instance_id
        ]

    first = inst.pid
    await until(lambda: hellos() == [(f"hello {first}", str(first))])
    await kernel.units["say"].restart(inst, "test")
    second = inst.pid
    # the files hold the old line first: read again, it would come before the new one
    await until(lambda: (f"hello {second}", str(second)) in hellos())
    assert hellos() == [(f"hello {first}", str(first)), (f"hello {second}", str(second))]
    assert kernel.output_tail(inst) == [f"hello {first}", f"hello {second}"]


async def test_a_changed_kernel_environment_reaches_the_next_spawn(hsu_kernel_factory, monkeypatch):
    show = [
        "python",
        "-c",
        "import os, time; print(os.environ['HSU_T_PASSED'], flush=True); time.sleep(600)",
    ]
    unit = managed(show, start="at-start", pass_env=["PATH", "HSU_T_*"])
    monkeypatch.setenv("HSU_T_PASSED", "one")
    kernel = await hsu_kernel_factory({"units": {"show": unit}})
    [inst] = kernel.instances.values()
    await until(lambda: kernel.output_tail(inst) == ["one"])
    monkeypatch.setenv("HSU_T_PASSED", "two")
    await kernel.units["show"].restart(inst, "test")
    await until(lambda: kernel.output_tail(inst) == ["one", "two"])
