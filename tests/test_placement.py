"""``placement: singleton`` units (started only where a leadership plugin
scales them up) and the ``hsu_instance_env`` hook that hands an instance what
only a plugin knows at launch (a fencing token)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

import hsu
from hsu.errors import ConfigError, HsuError
from hsu.testing import build_kernel

pytestmark = pytest.mark.integration

ECHO = {"command": ["python", "-m", "hsu_echo"], "interfaces": ["hsu.echo.v1.Echo"]}


class Fencing:
    """Adds a token to the singleton unit's instances; tries to replace HSU_UNIT."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @hsu.hookimpl
    def hsu_instance_env(self, kernel, unit, instance_id):
        self.calls.append((unit, instance_id))
        if unit != "dump":
            return None
        return {"HSU_FENCING_TOKEN": "42", "HSU_UNIT": "forged"}


async def test_a_plugin_adds_to_an_instance_environment_but_not_the_kernels_own(
    hsu_kernel_factory, tmp_path: Path
) -> None:
    out = tmp_path / "env.txt"
    code = (
        "import os, pathlib, time; pathlib.Path(os.environ['OUT'] + '.tmp').write_text("
        "os.environ.get('HSU_FENCING_TOKEN', '') + ' ' + os.environ['HSU_UNIT']);"
        " os.rename(os.environ['OUT'] + '.tmp', os.environ['OUT']); time.sleep(60)"
    )
    fencing = Fencing()
    kernel = await hsu_kernel_factory(
        {
            "units": {
                "dump": {
                    "kind": "managed",
                    "command": [sys.executable, "-c", code],
                    "env": {"OUT": str(out)},
                    "start": "at-start",
                    "stop_grace": 2,
                }
            }
        },
        plugins=[fencing],
    )
    [inst] = kernel.instances.values()
    for _ in range(500):
        if out.exists():
            break
        await asyncio.sleep(0.02)
    assert out.read_text() == "42 dump"
    assert fencing.calls == [("dump", inst.instance_id)]


async def test_a_singleton_unit_starts_neither_at_start_nor_on_demand_only_when_scaled(
    hsu_kernel_factory,
) -> None:
    kernel = await hsu_kernel_factory({"units": {"echo": {**ECHO, "placement": "singleton"}}})
    assert not kernel.instances
    with pytest.raises(HsuError, match="'echo' is a singleton"):
        await kernel.instance_for("hsu.echo.v1.Echo")
    assert not kernel.instances
    await kernel.scale("echo", 1)  # what the leadership plugin does where it leads
    [inst] = kernel.instances.values()
    assert inst.state.value == "ready"
    assert (await kernel.instance_for("hsu.echo.v1.Echo")) is inst
    await kernel.scale("echo", 0)
    assert not [i for i in kernel.instances.values() if i.state.value == "ready"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"start": "at-start"}, "units.echo.start"),
        ({"min_instances": 1}, "units.echo.min_instances"),
        ({"max_instances": 2}, "units.echo.max_instances"),
        ({"idle_timeout": 5}, "units.echo.idle_timeout"),
    ],
)
def test_a_singleton_that_could_run_twice_or_idle_out_is_a_config_error(extra, field) -> None:
    with pytest.raises(ConfigError) as info:
        build_kernel({"units": {"echo": {**ECHO, "placement": "singleton", **extra}}})
    assert field in str(info.value) and "placement: singleton" in str(info.value)


def test_an_unknown_placement_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"units\.echo\.placement"):
        build_kernel({"units": {"echo": {**ECHO, "placement": "everywhere"}}})
