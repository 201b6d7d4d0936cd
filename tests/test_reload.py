"""Hot reload: `hsu reload`, SIGHUP and file watching apply only the difference."""

from __future__ import annotations

import json
import signal

import psutil
import pytest

import hsu
from conftest import run_hsu, wait_until, write_deployment
from hsu._kernel.config.model import deployment_from_dict
from hsu.errors import ConfigError

SLEEP = '["python", "-c", "import time; time.sleep(600)"]'


def yaml_for(sleepers: int = 1, *, extra: bool = False, other: bool = True, tag: str = "a") -> str:
    text = f"""\
name: reloading
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    start: at-start
    env: {{TAG: {tag}}}
    stop_grace: 5
  sleeper:
    command: {SLEEP}
    kind: managed
    start: at-start
    min_instances: {sleepers}
    max_instances: 3
    stop_grace: 2
"""
    if other:
        text += f"""\
  other:
    command: {SLEEP}
    kind: managed
    start: at-start
    stop_grace: 2
"""
    if extra:
        text += f"""\
  extra:
    command: {SLEEP}
    kind: managed
    start: at-start
    stop_grace: 2
"""
    return text


def instances(address: str) -> dict[str, list[tuple[str, str, int]]]:
    out = run_hsu("status", "--json", "--address", address)
    assert out.returncode == 0, out.stderr
    found: dict[str, list[tuple[str, str, int]]] = {}
    for i in json.loads(out.stdout)["instances"]:
        found.setdefault(i["unit"], []).append((i["instance_id"], i["state"], i.get("pid", 0)))
    return found


def ready_pids(address: str, unit: str) -> set[int]:
    return {pid for _, state, pid in instances(address).get(unit, []) if state == "ready"}


def test_reload_rescales_one_unit_and_leaves_every_other_pid_alone(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", yaml_for(1))
    k = kernel_process(path)
    k.wait_ready()
    before = instances(k.address)
    assert len(before["sleeper"]) == 1 and all(s == "ready" for _, s, _ in before["sleeper"])
    echo, other = ready_pids(k.address, "echo"), ready_pids(k.address, "other")
    [old_sleeper] = before["sleeper"]

    write_deployment(path, yaml_for(3))
    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded: changed sleeper"
    after = instances(k.address)
    assert len(ready_pids(k.address, "sleeper")) == 3
    assert old_sleeper in after["sleeper"]  # the first one was not replaced
    assert ready_pids(k.address, "echo") == echo and ready_pids(k.address, "other") == other

    # scale down by SIGHUP: the surplus stops, and still nothing else moves
    write_deployment(path, yaml_for(1))
    k.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(instances(k.address)["sleeper"]) == 1)
    assert ready_pids(k.address, "echo") == echo and ready_pids(k.address, "other") == other
    code, _, err = k.stop()
    assert code == 0, err


def test_a_broken_reload_changes_nothing_and_says_what_is_wrong(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", yaml_for(2))
    k = kernel_process(path)
    k.wait_ready()
    before = instances(k.address)

    broken = yaml_for(3).replace("max_instances: 3", "max_instances: three")
    broken = broken.replace("stop_grace: 5", "stop_grace: 5\n    restrat: {policy: never}")
    write_deployment(path, broken)
    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr and "Traceback" not in out.stderr
    assert f"{path}:15: units.sleeper.max_instances: expected int, got 'three'" in out.stderr
    assert "units.echo.restrat: unknown key; did you mean 'restart'?" in out.stderr
    # SIGHUP with the same broken file: rejected too, and logged
    k.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload rejected" in k.output()[1])
    assert instances(k.address) == before

    # a plugin-list change is refused: plugins load only at start
    write_deployment(path, yaml_for(2).replace("name: reloading", "name: reloading\nplugins: [x]"))
    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 1 and "plugins load when the kernel starts" in out.stderr
    assert instances(k.address) == before
    code, _, err = k.stop()
    assert code == 0, err


def test_reload_adds_removes_and_restarts_what_changed(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", yaml_for(1))
    k = kernel_process(path)
    k.wait_ready()
    echo, sleeper = ready_pids(k.address, "echo"), ready_pids(k.address, "sleeper")
    [other_pid] = ready_pids(k.address, "other")

    # echo's environment changes: it gets a new process; other goes, extra comes
    write_deployment(path, yaml_for(1, extra=True, other=False, tag="b"))
    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "reloaded: added extra; removed other; changed echo; restarted echo"
    )
    now = instances(k.address)
    assert "other" not in now and not psutil.pid_exists(other_pid)
    assert len(ready_pids(k.address, "extra")) == 1
    new_echo = ready_pids(k.address, "echo")
    assert len(new_echo) == 1 and new_echo != echo
    assert ready_pids(k.address, "sleeper") == sleeper
    code, _, err = k.stop()
    assert code == 0, err


def test_file_watching_reloads_on_its_own(kernel_process, tmp_path):
    text = yaml_for(1, other=False).replace(
        "name: reloading", "name: w\nkernel: {watch_config: true}"
    )
    path = write_deployment(tmp_path / "d.yaml", text)
    k = kernel_process(path)
    k.wait_ready()
    echo = ready_pids(k.address, "echo")
    write_deployment(path, text.replace("min_instances: 1", "min_instances: 2"))
    wait_until(lambda: len(ready_pids(k.address, "sleeper")) == 2)
    assert ready_pids(k.address, "echo") == echo
    code, _, err = k.stop()
    assert code == 0, err
    assert "reloading: a config source changed" in err


class Recorder:
    def __init__(self):
        self.reloads = []

    @hsu.hookimpl
    def hsu_config_reloaded(self, kernel, old, changes):
        self.reloads.append((old.units["s"].min_instances, kernel.unit("s").min_instances, changes))


def raw(min_instances: int) -> dict:
    return {
        "units": {
            "s": {
                "command": ["python", "-c", "import time; time.sleep(600)"],
                "kind": "managed",
                "min_instances": min_instances,
                "max_instances": 2,
                "stop_grace": 1,
            }
        }
    }


async def test_the_reload_hook_sees_old_and_new_and_a_rejected_reload_calls_nothing(
    hsu_kernel_factory, tmp_path
):
    recorder = Recorder()
    kernel = await hsu_kernel_factory(raw(0), plugins=[recorder])
    assert kernel.instances == {}
    changes = await kernel.reload(deployment_from_dict(raw(2), base_dir=str(tmp_path)))
    assert changes.changed == ("s",) and changes.restarted == ()
    assert [i.state for i in kernel.instances.values()] == [hsu.InstanceState.READY] * 2
    assert recorder.reloads == [(0, 2, changes)]

    bad = raw(3)  # more than max_instances
    with pytest.raises(ConfigError, match=r"units\.s\.min_instances: 3 is more than max_instances"):
        await kernel.reload(deployment_from_dict(bad, base_dir=str(tmp_path)))
    assert len(recorder.reloads) == 1 and kernel.unit("s").min_instances == 2
    assert len(kernel.instances) == 2


def test_with_many_units_a_reload_restarts_exactly_the_units_that_changed(kernel_process, tmp_path):
    """200 units of one instance: one unit's env changes, then a secret file
    one unit reads and an env_file another reads (neither in the unit's
    mapping as written); each reload restarts those units' instances and no
    other pid moves."""
    n = 200
    (tmp_path / "secret.txt").write_text("first-secret")
    (tmp_path / "app.env").write_text("GREETING=hello\n")

    def text(tag: str) -> str:
        out = ["name: many", "units:"]
        for i in range(n):
            out += [f"  u{i}:", "    kind: managed", "    command: [sleep, '600']"]
            out += ["    start: at-start", "    stop_grace: 2"]
            if i == 100:
                out.append(f"    env: {{TAG: {tag}}}")
            if i == 7:
                out.append("    env: {TOKEN: '${file:secret.txt}'}")
            if i == 8:
                out.append("    env_file: app.env")
        return "\n".join(out) + "\n"

    def pids() -> dict[str, int]:
        found = {
            u: [p for _, s, p in insts if s == "ready"] for u, insts in instances(k.address).items()
        }
        assert all(len(p) <= 1 for p in found.values()), found
        return {u: p[0] for u, p in found.items() if p}

    path = write_deployment(tmp_path / "d.yaml", text("a"))
    k = kernel_process(path)
    k.wait_ready()
    wait_until(lambda: len(pids()) == n, 60)
    before = pids()

    write_deployment(path, text("b"))
    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded: changed u100; restarted u100"
    wait_until(lambda: len(pids()) == n)
    after = pids()
    assert {u for u in after if after[u] != before[u]} == {"u100"}

    (tmp_path / "secret.txt").write_text("second-secret")
    (tmp_path / "app.env").write_text("GREETING=changed\n")
    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded: changed u7, u8; restarted u7, u8"
    wait_until(lambda: len(pids()) == n)
    again = pids()
    assert {u for u in again if again[u] != after[u]} == {"u7", "u8"}
    environ = psutil.Process(again["u7"]).environ()
    assert environ["TOKEN"] == "second-secret"
    assert psutil.Process(again["u8"]).environ()["GREETING"] == "changed"

    out = run_hsu("reload", "--address", k.address)
    assert out.returncode == 0 and out.stdout.strip() == "reloaded: nothing changed"
    assert pids() == again
    code, _, err = k.stop()
    assert code == 0, err
