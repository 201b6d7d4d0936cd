"""Secrets stay secret: `hsu config show`, error messages, command lines,
`${file:..}` confinement, unit tokens, and the environment HSUs inherit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import hsu_env, run_hsu, write_deployment
from hsu._kernel.config import loader as config_loader
from hsu._kernel.config.model import UnitSpec, deployment_from_dict
from hsu.config import DEFAULT_PASS_ENV, SecretStr, child_env, redact
from hsu.errors import ConfigError

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
ENV_SECRET = "env-secret-value-1"
FILE_SECRET = "file-secret-value-2"
TOKEN = "unmanaged-token-0123456789"

SHOWN = f"""\
units:
  echo:
    command: [python, -m, hsu_echo]
    interfaces: [hsu.echo.v1.Echo]
    env:
      TOKEN: ${{env:S}}
      MIXED: "Bearer ${{file:pw}}"
    health:
      probe: exec
      options:
        command: [check, "${{file:pw}}"]
    routing:
      idempotent: [Get, "${{env:S}}"]
  far:
    kind: unmanaged
    address: 127.0.0.1:9
    token: {TOKEN}
"""


def validate_cli(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_hsu("config", "validate", str(path), *args, env=hsu_env(**env))


def load(path: Path, **env: str):
    return config_loader.validate(config_loader.context([path], env=env))


def problems(path: Path, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, **env)
    return info.value.problems


# -- hsu config show ------------------------------------------------------------


def test_config_show_hides_every_resolved_value_in_lists_and_mappings(tmp_path):
    (tmp_path / "pw").write_text(FILE_SECRET + "\n")
    path = write_deployment(tmp_path / "d.yaml", SHOWN)
    text = run_hsu("config", "show", str(path), env=hsu_env(S=ENV_SECRET))
    as_json = run_hsu("config", "show", str(path), "--json", env=hsu_env(S=ENV_SECRET))
    for out in (text, as_json):
        assert out.returncode == 0, out.stderr
        for secret in (ENV_SECRET, FILE_SECRET, TOKEN):
            assert secret not in out.stdout
    rows = {r["path"]: r for r in json.loads(as_json.stdout)}
    assert rows["units.echo.env.TOKEN"]["value"] == "${env:S}"
    assert rows["units.echo.env.MIXED"]["value"] == "Bearer ${file:pw}"
    assert rows["units.echo.routing.idempotent"]["value"] == ["Get", "${env:S}"]
    assert rows["units.echo.health.options.command"]["value"] == ["check", "${file:pw}"]
    assert rows["units.far.token"]["value"] == "***"
    for key in ("env.TOKEN", "routing.idempotent", "health.options.command"):
        assert rows[f"units.echo.{key}"]["secret"] is True
    assert rows["units.echo.routing.max_attempts"]["secret"] is False
    assert (
        'units.echo.routing.idempotent = ["Get", "${env:S}"]'
        f"  # {path}:13 (secret reference, value not shown)"
    ) in text.stdout
    # what the kernel gets is the resolved value
    d, _ = load(path, S=ENV_SECRET)
    assert d.units["echo"].routing.idempotent == ("Get", ENV_SECRET)
    assert d.units["echo"].env["MIXED"] == f"Bearer {FILE_SECRET}"


# -- error messages -------------------------------------------------------------


def test_error_messages_never_quote_a_resolved_value(tmp_path):
    text = """\
units:
  w:
    kind: managed
    command: [sleep, '1']
    max_instances: ${env:S}
    stop_signal: ${env:SHORT}
    health: {probe: tcp, options: {port: "${env:S}"}}
"""
    path = write_deployment(tmp_path / "d.yaml", text)
    out = validate_cli(path, S=ENV_SECRET, SHORT="ab")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert ENV_SECRET not in out.stderr and "'ab'" not in out.stderr
    assert f"{path}:5: units.w.max_instances: expected int, got '***'" in out.stderr
    assert f"{path}:6: units.w.stop_signal: unknown signal '***'" in out.stderr
    # a plugin's options, checked once the kernel is built
    fixed = text.replace("${env:SHORT}", "TERM").replace("max_instances: ${env:S}", "")
    write_deployment(path, fixed)
    out = validate_cli(path, S=ENV_SECRET)
    assert out.returncode == 1 and ENV_SECRET not in out.stderr
    assert "units.w.health.options.port: expected int, got '***'" in out.stderr


def test_a_resolved_value_quoted_by_a_message_is_hidden_by_its_repr():
    value = SecretStr("hunter22")
    assert value == "hunter22" and str(value) == "hunter22" and f"{value}" == "hunter22"
    assert repr(value) == "'***'" and repr([value]) == "['***']"
    assert os.fspath(Path(value)) == "hunter22"


def test_reload_errors_never_quote_a_resolved_value(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", "name: hidden\nunits: {}\n")
    k = kernel_process(path, hsu_env(S=ENV_SECRET))
    k.wait_ready()
    write_deployment(
        path,
        "name: hidden\nunits:\n  w:\n    kind: managed\n    command: [sleep, '1']\n"
        "    stop_grace: ${env:S}\n",
    )
    out = run_hsu("reload", "--address", k.address, timeout=30)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
    assert (
        f"{path}:6: units.w.stop_grace: expected seconds or a duration (500ms, 5s, 2m), got '***'"
        in out.stderr
    )
    assert ENV_SECRET not in out.stderr
    code, _, err = k.stop()
    assert code == 0, err
    assert ENV_SECRET not in err


# -- command lines ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "field", "line"),
    [
        ("command: [python, -c, '${env:S}']", "command", 4),
        ("command: python -c ${env:S}", "command", 4),
        ("command: [python]\n    args: [--token, '${file:pw}']", "args", 5),
    ],
)
def test_a_secret_reference_in_the_command_line_is_refused(tmp_path, unit, field, line):
    (tmp_path / "pw").write_text(FILE_SECRET)
    path = write_deployment(tmp_path / "d.yaml", f"units:\n  w:\n    kind: managed\n    {unit}\n")
    assert problems(path, S=ENV_SECRET) == [
        f"{path}:{line}: units.w.{field}: secret references are not allowed in the command"
        " line (visible in /proc/PID/cmdline); pass it in env or a file"
    ]


def test_a_secret_reference_in_the_command_line_from_set_is_refused_too(tmp_path):
    path = write_deployment(
        tmp_path / "d.yaml", "units:\n  w:\n    kind: managed\n    command: [sleep]\n"
    )
    out = validate_cli(path, "--set", "units.w.args=['${env:S}']", S=ENV_SECRET)
    assert out.returncode == 1 and ENV_SECRET not in out.stderr
    assert "units.w.args: secret references are not allowed in the command line" in out.stderr


# -- ${file:..} stays in the deployment's folder ---------------------------------------


def with_file_ref(folder: Path, ref: str) -> Path:
    return write_deployment(
        folder / "d.yaml",
        "units:\n  w:\n    kind: managed\n    command: [sleep, '1']\n"
        f"    env: {{PW: '${{file:{ref}}}'}}\n",
    )


def test_a_file_reference_outside_the_deployment_folder_is_refused(tmp_path):
    dep = tmp_path / "dep"
    dep.mkdir()
    (tmp_path / "secret").write_text(FILE_SECRET)
    for ref in ("../secret", str(tmp_path / "secret")):
        path = with_file_ref(dep, ref)
        [problem] = problems(path)
        assert problem.startswith(f"{path}:5: units.w.env.PW: ${{file:{ref}}}: ")
        assert "is outside the folders secrets may be read from" in problem
        assert problem.endswith(f": {dep}; kernel.secret_roots adds folders")
        assert FILE_SECRET not in problem
    out = validate_cli(with_file_ref(dep, "../secret"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "../secret is outside the folders secrets may be read from" in out.stderr


def test_a_symlink_out_of_the_folder_is_refused_and_one_inside_is_followed(tmp_path):
    dep = tmp_path / "dep"
    (dep / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text(FILE_SECRET)
    (dep / "escape").symlink_to(tmp_path / "secret")
    [problem] = problems(with_file_ref(dep, "escape"))
    assert f"(it resolves to {tmp_path / 'secret'})" in problem
    (dep / "sub" / "pw").write_text("inside-value\n")
    (dep / "inner").symlink_to(dep / "sub" / "pw")
    d, _ = load(with_file_ref(dep, "inner"))
    assert d.units["w"].env["PW"] == "inside-value"
    d, _ = load(with_file_ref(dep, "sub/pw"))
    assert d.units["w"].env["PW"] == "inside-value"


def test_kernel_secret_roots_allow_other_folders(tmp_path):
    dep, vault = tmp_path / "dep", tmp_path / "vault"
    dep.mkdir()
    vault.mkdir()
    (vault / "pw").write_text(FILE_SECRET)
    path = with_file_ref(dep, str(vault / "pw"))
    assert "is outside the folders" in problems(path)[0]
    path.write_text(path.read_text() + "kernel:\n  secret_roots: [../vault]\n")
    d, settings = load(path)
    assert d.units["w"].env["PW"] == FILE_SECRET
    assert settings["kernel"].secret_roots == ("../vault",)


def test_secret_files_are_bounded_and_their_content_never_shown(tmp_path):
    (tmp_path / "big").write_text("x" * (64 * 1024 + 1))
    [problem] = problems(with_file_ref(tmp_path, "big"))
    assert problem.endswith(f"{tmp_path / 'big'} is larger than 65536 bytes")
    (tmp_path / "latin").write_bytes(b"caf\xe9-" + FILE_SECRET.encode())
    [problem] = problems(with_file_ref(tmp_path, "latin"))
    assert problem.endswith(f"{tmp_path / 'latin'} is not valid UTF-8 at byte 3")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_another_user_cannot_plant_a_symlink_to_read_a_root_only_file(tmp_path):
    """A deployment in a folder another local user can write: they replace the
    secret file with a symlink to a file only root reads. Refused, unread."""
    private = tmp_path / "root-only"
    private.write_text(FILE_SECRET)
    private.chmod(0o600)
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        dep = Path(shared)
        dep.chmod(0o777)
        (dep / "pw").write_text("harmless")
        (dep / "pw").unlink()
        planted = subprocess.run(
            [*NOBODY, "ln", "-s", str(private), str(dep / "pw")], capture_output=True, timeout=10
        )
        assert planted.returncode == 0, planted.stderr
        assert (dep / "pw").lstat().st_uid == 65534
        out = validate_cli(with_file_ref(dep, "pw"))
        assert out.returncode == 1
        assert f"(it resolves to {private})" in out.stderr
        assert FILE_SECRET not in out.stderr + out.stdout


# -- Deployment.secrets and redact() ------------------------------------------------------


def test_deployment_secrets_hold_resolved_values_and_tokens_of_four_characters_or_more(
    tmp_path,
):
    path = write_deployment(
        tmp_path / "d.yaml",
        SHOWN.replace("${file:pw}", "${env:TINY}"),
    )
    d, _ = load(path, S=ENV_SECRET, TINY="abc")
    assert isinstance(d.secrets, frozenset)
    assert d.secrets == {ENV_SECRET, TOKEN}  # "abc" is too short to redact from text
    assert d.secrets.redact(f"x={ENV_SECRET} t={TOKEN}") == "x=*** t=***"


def test_redact_hides_each_secret_whole():
    assert redact("a hunter2 b hunter22 c", ["hunter2", "hunter22"]) == "a *** b *** c"
    assert redact("nothing here", []) == "nothing here"
    assert redact("keep", [""]) == "keep"
    assert redact("a.b+c a.b+c", ["a.b+c"]) == "*** ***"  # not a regular expression


# -- unmanaged unit tokens ---------------------------------------------------------------


def test_a_token_is_for_unmanaged_units_and_must_be_long(tmp_path):
    unmanaged = {"kind": "unmanaged", "address": "127.0.0.1:9"}
    d = deployment_from_dict({"units": {"u": {**unmanaged, "token": TOKEN}}})
    assert d.units["u"].token == TOKEN
    with pytest.raises(ConfigError) as info:
        deployment_from_dict({"units": {"u": {**unmanaged, "token": "short"}}}, source="d.yaml")
    assert info.value.problems == [
        "d.yaml: units.u.token: must be at least 16 printable ASCII characters without"
        " spaces (got 5 characters)"
    ]
    with pytest.raises(ConfigError, match="only an unmanaged unit takes a token"):
        deployment_from_dict({"units": {"u": {"command": ["x"], "token": TOKEN}}})


def test_a_token_from_the_environment(tmp_path):
    path = write_deployment(
        tmp_path / "d.yaml",
        "units:\n  far:\n    kind: unmanaged\n    address: 127.0.0.1:9\n"
        "    token: ${env:FAR_TOKEN}\n",
    )
    d, _ = load(path, FAR_TOKEN=TOKEN)
    assert d.units["far"].token == TOKEN and TOKEN in d.secrets
    [problem] = problems(path, FAR_TOKEN="abc")
    assert problem.endswith("units.far.token: must be at least 16 printable ASCII characters"
                            " without spaces (got 3 characters)")  # fmt: skip


# -- the environment an HSU inherits ----------------------------------------------------------


def test_child_env_passes_only_the_allowed_variables():
    kernel_env = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "LANG": "C",
        "PYTHONPATH": "/src",
        "AWS_SECRET_ACCESS_KEY": "x",
        "DATABASE_URL": "postgres://u:p@h/db",
        "HSU_PLUGINS": "x",
        "path": "lowercase is another variable",
    }
    assert child_env(DEFAULT_PASS_ENV, kernel_env) == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "LANG": "C",
        "PYTHONPATH": "/src",
    }
    assert child_env(["DATABASE_*", "PATH"], kernel_env) == {
        "PATH": "/usr/bin",
        "DATABASE_URL": "postgres://u:p@h/db",
    }
    assert child_env(["*"], kernel_env) == kernel_env
    assert child_env([], kernel_env) == {}


def test_pass_env_defaults_to_the_allowlist_and_a_unit_can_set_its_own():
    assert UnitSpec().pass_env == DEFAULT_PASS_ENV
    d = deployment_from_dict({"units": {"w": {"command": ["x"], "pass_env": ["PATH", "APP_*"]}}})
    assert d.units["w"].pass_env == ("PATH", "APP_*")
    with pytest.raises(ConfigError, match=r"units\.w\.pass_env: expected a list of strings"):
        deployment_from_dict({"units": {"w": {"command": ["x"], "pass_env": "PATH"}}})


# -- at run time ----------------------------------------------------------------

LEAKY = """\
name: leaky
units:
  leaky:
    command:
      - python
      - -c
      - |
        import os, sys
        print("my secret is", os.environ["S"], flush=True)
        print("NOT_PASSED" in os.environ, "PATH" in os.environ, flush=True)
        sys.exit(3)
    env:
      S: ${env:HSU_TEST_SECRET}
    restart: {policy: never}
    startup_timeout: 10
"""


def test_what_an_hsu_prints_of_a_secret_is_hidden_in_logs_status_and_errors(
    kernel_process, tmp_path
):
    path = write_deployment(tmp_path / "d.yaml", LEAKY)
    k = kernel_process(path, hsu_env(HSU_TEST_SECRET=ENV_SECRET, NOT_PASSED="1"))
    k.wait_ready()
    started = run_hsu("start", "leaky", "--address", k.address, timeout=30)
    assert "exited with status 3" in started.stdout, started.stdout + started.stderr
    assert ENV_SECRET not in started.stdout + started.stderr
    status = run_hsu("status", "--json", "--address", k.address, timeout=30)
    [inst] = json.loads(status.stdout)["instances"]
    assert "exited with status 3" in inst["last_exit"] and ENV_SECRET not in status.stdout
    logs = run_hsu("logs", "leaky", "--address", k.address, timeout=30)
    assert "my secret is ***" in logs.stdout, logs.stdout
    # the kernel's environment reached the HSU only through pass_env
    assert "False True" in logs.stdout
    assert ENV_SECRET not in logs.stdout
    code, out, err = k.stop()
    assert code == 0, err
    assert ENV_SECRET not in out + err
