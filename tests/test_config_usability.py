"""Config mistakes a new user made (issue 19), each a test that failed before
its fix: durations, one-pass errors, addresses, plugin names, env_file, the
idle timeout of on-demand units."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

from conftest import HSU, hsu_env, until
from hsu import InstanceState
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


def test_every_mistake_of_a_deployment_is_reported_in_one_pass(tmp_path):
    """Before: a unit's error hid kernel.* and plugin-section errors (and an
    unknown plugin name stopped everything with no hint)."""
    out = validate(
        tmp_path,
        """\
plugins: [gateway_nginx]
kernel:
  drain_grace: soon
  address: ":99999"
units:
  echo:
    command: [python, -m, hsu_echo]
    stop_grase: 3
    max_instances: 0
    restart: {backoff: {jitter: 3}}
  other:
    command: [python, -m, hsu_echo]
    launcher: nope
gateway_nginx:
  workers: 2
""",
    )
    d = tmp_path / "d.yaml"
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == f"hsu: error: invalid deployment {d}: 8 problem(s)"
    expected = [
        f"{d}:8: units.echo.stop_grase: unknown key; did you mean 'stop_grace'?",
        f"{d}:9: units.echo.max_instances: must be >= 1, got 0",
        f"{d}:10: units.echo.restart.backoff.jitter: must be <= 1, got 3.0",
        f"{d}:1: plugins[0]: unknown plugin 'gateway_nginx'; did you mean"
        " 'hsu_plugins.gateway.nginx'?",
        f"{d}:14: gateway_nginx: no enabled plugin has a settings section of this name; is it"
        " the section of plugin 'hsu_plugins.gateway.nginx'? enable it: plugins:"
        " [hsu_plugins.gateway.nginx]",
        f"{d}:3: kernel.drain_grace: expected seconds or a duration (500ms, 5s, 2m), got 'soon'",
        f"{d}:4: kernel.address: port 99999 is out of range 0-65535",
        f"{d}:13: units.other.launcher: no launcher named 'nope' (registered: subprocess)",
    ]
    for line in expected:
        assert any(got.strip().startswith(line) for got in lines[1:]), (line, lines)
    # the same from `hsu run`, which starts nothing
    run = hsu("run", str(d))
    assert run.returncode != 0 and "8 problem(s)" in run.stderr


def test_a_misspelt_plugin_name_gets_a_hint(tmp_path):
    for written in ("gateway_nginx", "hsu_plugins.gateway_nginx", "hsu-plugins.gateway.nginx"):
        out = validate(tmp_path, f"plugins: [{written}]\n")
        assert f"unknown plugin {written!r}; did you mean 'hsu_plugins.gateway.nginx'?" in (
            out.stderr
        ), out.stderr
        assert "Traceback" not in out.stderr
    # from -p, at once, with the hint too
    (tmp_path / "e.yaml").write_text("units: {}\n")
    out = hsu("config", "validate", str(tmp_path / "e.yaml"), "-p", "registry-memory")
    assert "unknown plugin 'registry-memory'; did you mean 'registry_memory'?" in out.stderr


@pytest.mark.parametrize(
    ("address", "says"),
    [
        (":99999", "port 99999 is out of range 0-65535"),
        (":-5", "port '-5' is not a number 0-65535"),
        ("localhost", "no port; write HOST:PORT (127.0.0.1:7420) or unix:/absolute/path"),
        (":7420", "no host; write 127.0.0.1:7420 (this machine only)"),
        ("unix:", "a unix socket needs an absolute path"),
        ("unix:kernel.sock", "a unix socket needs an absolute path"),
        ("::1:7420", "an IPv6 address needs brackets: [::1]:7420"),
        ("bad host:1", "whitespace or a control character"),
        (f"unix:/{'x' * 120}", "a unix path longer than 107 bytes"),
    ],
)
def test_listen_addresses_are_checked(tmp_path, address, says):
    """Before: ':99999' listened on 34463, ':-5' on 65531, 'localhost' on 443."""
    for key in ("address", "control"):
        out = validate(tmp_path, f'kernel:\n  {key}: "{address}"\n')
        assert f"d.yaml:2: kernel.{key}: {says}" in out.stderr, out.stderr
    out = validate(
        tmp_path, f'plugins: [hsu_plugins.gateway.nginx]\ngateway_nginx: {{address: "{address}"}}\n'
    )
    assert f"gateway_nginx.address: {says}" in out.stderr, out.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:7420", "localhost:7420", "0.0.0.0:7420"])
def test_good_listen_addresses_pass(tmp_path, address):
    out = validate(tmp_path, f'kernel:\n  address: "{address}"\n  insecure: true\n')
    assert out.returncode == 0, out.stderr


def test_an_address_on_the_command_line_is_checked_too(tmp_path):
    (tmp_path / "d.yaml").write_text("units: {}\n")
    out = hsu("run", str(tmp_path / "d.yaml"), "--address", ":99999")
    assert out.returncode != 0
    assert "--address: port 99999 is out of range 0-65535" in out.stderr


# -- env_file ----------------------------------------------------------------------


def test_an_env_file_reads_like_dotenv():
    from hsu.config import parse_env_file

    text = (
        "# a comment\n"
        "\n"
        "export PLAIN=1\n"
        "SPACED = two words  # a comment\n"
        "SINGLE='kept # as is \\n'\n"
        'DOUBLE="a\\tb \\"q\\" \\n"\n'
        "EMPTY=\n"
        "HASH=a#b\n"
        "PLAIN=2\n"
    )
    assert parse_env_file(text, "app.env") == {
        "PLAIN": "2",
        "SPACED": "two words",
        "SINGLE": "kept # as is \\n",
        "DOUBLE": 'a\tb "q" \n',
        "EMPTY": "",
        "HASH": "a#b",
    }


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("s3cret-token-value", "expected KEY=VALUE"),
        (
            "1KEY=s3cret",
            "the name before '=' must be letters, digits and '_', not starting with a digit",
        ),
        ('KEY="s3cret', 'a " quote that is not closed on its line'),
        ("KEY='s3cret' tail", "KEY: only a comment may follow the closing quote"),
    ],
)
def test_a_bad_env_file_line_is_named_by_file_and_line_without_its_value(line, why):
    from hsu.config import EnvFileError, parse_env_file

    with pytest.raises(EnvFileError) as info:
        parse_env_file(f"# first\nOK=1\n{line}\n", "app.env")
    assert str(info.value) == f"app.env:3: {why}"
    assert "s3cret" not in str(info.value)


def test_env_file_problems_are_config_errors_with_the_unit_field_file_and_line(tmp_path):
    (tmp_path / "bad.env").write_text("A=1\nnot a line\n")
    unit = {"command": ["true"]}
    with pytest.raises(ConfigError) as info:
        deployment_from_dict(
            {
                "units": {
                    "one": {**unit, "env_file": "missing.env"},
                    "two": {**unit, "env_file": "bad.env"},
                }
            },
            source="d.yaml",
            base_dir=str(tmp_path),
        )
    problems = info.value.problems
    assert any(
        p.startswith("d.yaml: units.one.env_file: missing.env: cannot read it: No such file")
        for p in problems
    ), problems
    assert "d.yaml: units.two.env_file: bad.env:2: expected KEY=VALUE" in problems


async def test_instances_get_the_env_file_under_env_and_a_reload_picks_up_a_change(
    hsu_kernel_factory, tmp_path
):
    """The variables reach the process (``env`` wins over the file); a
    reload after the file changed restarts the unit's instance, which gets
    the new values; a reload to a bad file is refused and the instance
    keeps running."""
    (tmp_path / "app.env").write_text("GREETING=hello\nexport WHO='the file'\n")
    script = 'printf "%s|%s" "$GREETING" "$WHO" > seen.txt; exec sleep 600'

    def raw():
        return {
            "units": {
                "shell": {
                    "kind": "managed",
                    "command": ["sh", "-c", script],
                    "start": "at-start",
                    "env_file": "app.env",
                    "env": {"WHO": "env"},
                    "stop_grace": 2,
                }
            }
        }

    seen = tmp_path / "seen.txt"
    kernel = await hsu_kernel_factory(raw())
    await until(lambda: seen.exists() and seen.read_text() == "hello|env", 20)
    [first] = [i.pid for i in kernel.instances.values()]

    (tmp_path / "app.env").write_text("GREETING=changed\n")
    changes = await kernel.reload(deployment_from_dict(raw(), base_dir=str(tmp_path)))
    assert changes.restarted == ("shell",)
    await until(lambda: seen.read_text() == "changed|env", 20)
    pids = [i.pid for i in kernel.instances.values() if i.state is InstanceState.READY]
    assert pids and first not in pids

    (tmp_path / "app.env").write_text("GREETING=fine\nbroken\n")
    with pytest.raises(ConfigError) as info:
        await kernel.reload(deployment_from_dict(raw(), base_dir=str(tmp_path), defer=True))
    assert "units.shell.env_file: app.env:2: expected KEY=VALUE" in str(info.value)
    assert [i.pid for i in kernel.instances.values()] == pids
