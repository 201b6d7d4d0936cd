"""Config mistakes a new user made (issue 19), each a test that failed before
its fix: durations, one-pass errors, addresses, plugin names, env_file, the
idle timeout of on-demand units."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

from conftest import HSU, hsu_env
from hsu._kernel.config.model import deployment_from_dict
from hsu.config import parse_duration
from hsu.errors import ConfigError
from hsu.testing import build_kernel

ECHO = {"command": ["python", "-m", "hsu_echo"], "interfaces": ["hsu.echo.v1.Echo"]}


def hsu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HSU, *args], capture_output=True, text=True, env=hsu_env(), timeout=60, cwd=cwd
    )


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    return hsu("config", "validate", str(path))


@pytest.mark.parametrize(
    ("written", "seconds"),
    [(5, 5.0), (2.5, 2.5), ("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0),
     ("1m30s", 90.0), ("1.5s", 1.5)],
)  # fmt: skip
def test_durations_are_accepted_wherever_seconds_are(written, seconds):
    assert parse_duration(written) == seconds
    d = deployment_from_dict(
        {
            "units": {
                "echo": {
                    **ECHO,
                    "stop_grace": written,
                    "restart": {"backoff": {"initial": written}},
                    "health": {"probe": "grpc", "interval": written},
                    "routing": {"drain_timeout": written},
                    "limits": {"interval": written},
                }
            }
        }
    )
    spec = d.units["echo"]
    assert spec.stop_grace == seconds and spec.restart.backoff.initial == seconds
    assert spec.health is not None and spec.health.interval == seconds
    assert spec.routing.drain_timeout == seconds and spec.limits.interval == seconds
    # kernel and plugin sections too (a plugin annotates with hsu.config.Seconds)
    kernel = build_kernel(
        {
            "kernel": {"drain_grace": written},
            "gateway_nginx": {"reload_timeout": written},
            "units": {"echo": ECHO},
        },
        names=["hsu_plugins.gateway.nginx"],
    )
    assert kernel.kernel_settings.drain_grace == seconds
    assert kernel.settings("gateway_nginx").reload_timeout == seconds


@pytest.mark.parametrize("bad", ["5x", "s", "-5s", "5 s s", True, "", "5s5"])
def test_a_bad_duration_says_what_is_accepted(bad):
    with pytest.raises(ConfigError) as info:
        deployment_from_dict({"units": {"e": {**ECHO, "stop_grace": bad}}}, source="d.yaml")
    assert info.value.problems == [
        f"d.yaml: units.e.stop_grace: expected seconds or a duration (500ms, 5s, 2m), got {bad!r}"
    ]


def test_the_json_schema_takes_durations(tmp_path):
    out = hsu("config", "schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    good = {"kernel": {"drain_grace": "2s"}, "units": {"e": {**ECHO, "stop_grace": "1m30s"}}}
    jsonschema.validate(good, schema)
    bad = {"units": {"e": {**ECHO, "stop_grace": "soon"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
