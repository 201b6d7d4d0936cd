"""Config input is bounded and clean: size, encoding, duplicate keys, aliases,
nesting, unit and deployment names; through `hsu config validate` and Reload."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_hsu, write_deployment
from hsu._kernel.config import loader as config_loader
from hsu._kernel.config.model import deployment_from_dict
from hsu._kernel.config.sources import merge
from hsu.config import (
    MAX_ALIASED_NODES,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    env_layer,
    overrides_layer,
    read_file,
)
from hsu.errors import ConfigError

GOOD = "units:\n  work:\n    kind: managed\n    command: [sleep, '1']\n"


def bomb(levels: int = 9, fan: int = 9) -> str:
    """The "billion laughs": each level a list of ``fan`` aliases to the one
    before; ``fan ** levels`` strings once expanded (9, 9: 387 million)."""
    lines = ["a: &a [" + ", ".join(["lol"] * fan) + "]"]
    for n in range(1, levels):
        name, prev = chr(ord("a") + n), chr(ord("a") + n - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_file(path)
    return info.value.problems


def one_problem_line(stderr: str) -> str:
    """The CLI prints a header and one indented line per problem."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("hsu: error: invalid deployment"), stderr
    assert lines[0].endswith("1 problem(s)"), stderr
    assert len(lines) == 2, stderr
    return lines[1].strip()


def test_invalid_utf8_is_one_line_saying_where_not_a_traceback(tmp_path):
    path = tmp_path / "d.yaml"
    head = b"units:\n  work:\n    command: [caf"
    path.write_bytes(head + b"\xe9]\n")
    out = run_hsu("config", "validate", str(path))
    assert out.returncode == 1
    problem = one_problem_line(out.stderr)
    assert problem == f"{path}: not valid UTF-8 at byte {len(head)} (line 3)"
    # TOML too
    toml = tmp_path / "d.toml"
    toml.write_bytes(b'name = "x"\n\xff = 1\n')
    assert problems_of(toml) == [f"{toml}: not valid UTF-8 at byte 11 (line 2)"]


@pytest.mark.parametrize(
    ("text", "line", "key", "first"),
    [
        ("units: {}\nname: a\nunits: {}\n", 3, "units", 1),
        ("units:\n  w:\n    command: [a]\n    kind: managed\n    command: [b]\n", 5, "command", 3),
        ("units:\n  w: {command: [a], env: {A: '1', A: '2'}}\n", 2, "A", 2),
        ('{"units": {}, "units": {}}', 1, "units", 1),
    ],
)
def test_a_duplicate_key_at_any_level_is_an_error_with_its_line(tmp_path, text, line, key, first):
    path = write_deployment(tmp_path / "d.yaml", text)
    assert problems_of(path) == [f"{path}:{line}: duplicate key {key!r} (first at line {first})"]


def test_duplicate_keys_in_toml_are_refused_too(tmp_path):
    path = write_deployment(tmp_path / "d.toml", 'name = "a"\nname = "b"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: not valid TOML:") and "line 2" in problem


def test_an_alias_bomb_is_refused_at_once_by_the_cli(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", bomb())
    assert path.stat().st_size < 600
    t0 = time.monotonic()
    out = run_hsu("config", "validate", str(path), timeout=30)
    elapsed = time.monotonic() - t0
    assert out.returncode == 1
    problem = one_problem_line(out.stderr)
    assert problem == (
        f"{path}:5: too many aliased nodes (YAML aliases repeat more than"
        f" {MAX_ALIASED_NODES:,} values)"
    ), f"{problem} after {elapsed:.1f}s"


def test_the_alias_bomb_through_env_and_set_is_refused_too():
    value = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 2000) + "]"
    with pytest.raises(ConfigError, match="env HSU_UNITS__W__ARGS: too many aliased nodes"):
        env_layer({"HSU_UNITS__W__ARGS": value})
    with pytest.raises(ConfigError, match=r"--set units\.w\.args=.*: too many aliased nodes"):
        overrides_layer((f"units.w.args={value}",))


def test_aliases_within_bounds_load_as_copies_so_merging_stays_linear(tmp_path):
    # 8**4 = 4096 aliased strings: allowed, and each is a copy, not a shared object
    path = write_deployment(tmp_path / "d.yaml", bomb(levels=4, fan=8))
    layer = read_file(path)
    d = layer.data["d"]
    assert len(d) == 8 and d[0] == d[1] and d[0] is not d[1]
    assert d[0][0] is not layer.data["c"][0]
    merged = merge([layer, layer])
    assert merged.data == layer.data
    # one more level is past the cap, however few bytes it takes
    with pytest.raises(ConfigError, match="too many aliased nodes"):
        read_file(write_deployment(tmp_path / "e.yaml", bomb(levels=5, fan=8)))


def test_a_self_referencing_alias_is_an_error(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", "units:\n  w: &w {command: [x], env: *w}\n")
    assert problems_of(path) == [f"{path}:2: a YAML alias refers to a value that contains it"]


def test_merge_keys_still_work_with_origins(tmp_path):
    text = (
        "units:\n"
        "  one: &base\n"
        "    command: [sleep, '1']\n"
        "    kind: managed\n"
        "    stop_grace: 3\n"
        "  two:\n"
        "    <<: *base\n"
        "    stop_grace: 4\n"
    )
    path = write_deployment(tmp_path / "d.yaml", text)
    d, _ = config_loader.validate(config_loader.context([path], env={}))
    assert d.units["two"].command == ("sleep", "1") and d.units["two"].stop_grace == 4
    assert str(d.origins[("units", "two", "stop_grace")]) == f"{path}:8"
    assert str(d.origins[("units", "two", "kind")]) == f"{path}:4"


def test_an_oversized_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(GOOD + "#" * MAX_FILE_BYTES + "\n")
    out = run_hsu("config", "validate", str(path))
    assert out.returncode == 1
    assert one_problem_line(out.stderr) == (
        f"{path}: larger than 1 MiB; a deployment file is at most {MAX_FILE_BYTES} bytes"
    )


def test_nesting_is_bounded(tmp_path):
    deep = "x: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n"
    [problem] = problems_of(write_deployment(tmp_path / "d.yaml", deep))
    assert problem == f"{tmp_path / 'd.yaml'}:1: nested more than {MAX_DEPTH} levels deep"
    deeper = "x = " + "[" * 5000 + "]" * 5000 + "\n"
    [problem] = problems_of(write_deployment(tmp_path / "d.toml", deeper))
    assert problem.startswith(f"{tmp_path / 'd.toml'}: nested")


def test_reading_is_safe_from_many_threads_at_once(tmp_path):
    good = write_deployment(tmp_path / "good.yaml", GOOD)
    bad = write_deployment(tmp_path / "bad.yaml", bomb())

    def read(path: Path) -> str:
        try:
            return repr(read_file(path).data)
        except ConfigError as exc:
            return exc.problems[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, [good, bad] * 16))
    assert set(results[0::2]) == {repr(read_file(good).data)}
    assert all("too many aliased nodes" in r for r in results[1::2])


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "Echo", "-x", "_x", "e.x", "", "x" * 64, "ünit", "a b"]
)
def test_unit_names_are_lowercase_words(name):
    with pytest.raises(ConfigError) as info:
        deployment_from_dict({"units": {name: {"command": ["x"]}}}, source="d.yaml")
    [problem] = info.value.problems
    assert problem.startswith("d.yaml: units")
    assert problem.endswith(
        f": {name!r} is not a valid unit name: use a-z, 0-9, '-' and '_', starting with a"
        " letter or digit, at most 63 characters"
    )


@pytest.mark.parametrize("name", ["echo", "e", "0", "hsu_echo", "a-b_c9", "x" * 63])
def test_valid_unit_names(name):
    assert name in deployment_from_dict({"units": {name: {"command": ["x"]}}}).units


def test_a_unit_named_to_escape_the_state_dir_is_refused_by_the_cli(tmp_path):
    path = write_deployment(tmp_path / "d.yaml", "units:\n  ../../x:\n    command: [x]\n")
    out = run_hsu("config", "validate", str(path))
    assert out.returncode == 1
    assert one_problem_line(out.stderr).startswith(
        f"{path}:2: units['../../x']: '../../x' is not a valid unit name"
    )


def test_deployment_names_cannot_leave_the_state_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"name: '\.\./x' is not a valid deployment name"):
        deployment_from_dict({"name": "../x"}, source="d.yaml")
    # a name taken from the file says so
    path = write_deployment(tmp_path / "my deploy.yaml", GOOD)
    with pytest.raises(ConfigError, match="from the file name; set name: to choose one"):
        config_loader.validate(config_loader.context([path], env={}))
    assert deployment_from_dict({"name": "Shop.v2-prod_1"}).name == "Shop.v2-prod_1"


def test_reload_refuses_bad_input_and_keeps_running(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", "name: bounded\nunits: {}\n")
    k = kernel_process(path)
    k.wait_ready()
    path.write_bytes(b"name: bounded\nunits: {}\n# \xff\n")
    out = run_hsu("reload", "--address", k.address, timeout=30)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "INVALID_ARGUMENT" in out.stderr and "UNKNOWN" not in out.stderr
    assert f"{path}: not valid UTF-8 at byte 26 (line 3)" in out.stderr
    write_deployment(path, "name: bounded\nunits: {}\n" + bomb())
    out = run_hsu("reload", "--address", k.address, timeout=30)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
    assert "too many aliased nodes" in out.stderr
    write_deployment(path, "name: bounded\nunits: {}\nunits: {}\n")
    out = run_hsu("reload", "--address", k.address, timeout=30)
    assert f"{path}:3: duplicate key 'units' (first at line 2)" in out.stderr
    assert run_hsu("status", "--address", k.address).returncode == 0
    code, _, err = k.stop()
    assert code == 0, err
