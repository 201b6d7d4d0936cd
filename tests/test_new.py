"""``hsu new``: each package it makes passes its own tests the moment it is
made, installed as a user would (a real wheel build of the generated
pyproject, into a target dir on PYTHONPATH; ``npm ci`` for Node)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_hsu
from hsu.testing import require_node

TEMPLATES = ROOT / "kernel" / "hsu" / "_kernel" / "templates"
NODE_HSU = ROOT / "contrib" / "hsu-echo-node"

pytestmark = pytest.mark.integration
#: a generated package's install and test run, each bounded on its own
#: (pip 120 s, its pytest or npm test 240 s), on a loaded machine
SLOW = pytest.mark.timeout(420)


def _new(*args: str) -> Path:
    done = run_hsu("new", *args)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("created ")
    return Path(first.removeprefix("created "))


def _install_and_test(package: Path, site: Path) -> str:
    """pip-install ``package`` (no deps: hsu and grpcio are the running
    environment's) into ``site``, then run its tests from its directory."""
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--disable-pip-version-check", "--target", str(site),
            str(package),
        ],
        check=True,
        timeout=120,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
    env["HSU_RUNTIME_DIR"] = os.environ["HSU_RUNTIME_DIR"]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=package,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


@SLOW
def test_new_python_hsu_passes_its_tests(tmp_path):
    package = _new("hsu", "calc", "--dir", str(tmp_path))
    assert package == tmp_path / "calc"
    # the code generated from its .proto is there, and the proto path follows the package
    assert (package / "calc" / "v1" / "calc_pb2_grpc.py").is_file()
    assert "package calc.v1;" in (package / "proto" / "calc" / "v1" / "calc.proto").read_text()
    assert 'session.install("grpcio-tools==' in (package / "noxfile.py").read_text()
    out = _install_and_test(package, tmp_path / "site")
    assert "4 passed" in out


@SLOW
def test_new_plugin_passes_its_tests(tmp_path):
    package = _new("plugin", "audit-log", "--dir", str(tmp_path))
    assert package == tmp_path / "hsu-plugin-audit-log"
    pyproject = (package / "pyproject.toml").read_text()
    assert '[project.entry-points.hsu]\naudit_log = "hsu_plugin_audit_log"' in pyproject
    out = _install_and_test(package, tmp_path / "site")
    assert "3 passed" in out


@SLOW
def test_new_node_hsu_passes_its_tests(tmp_path):
    package = _new("hsu", "calc-node", "--lang", "node", "--dir", str(tmp_path))
    # Core's and the Kernel API's contracts come from the installed hsu
    for rel in ("hsu/core/v1/core.proto", "hsu/kernel/v1/kernel.proto"):
        assert (package / "proto" / rel).read_text() == (ROOT / "proto" / rel).read_text()
    node = require_node(package)
    done = subprocess.run(
        [node.npm, "test"], cwd=package, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# pass 1" in done.stdout and "# fail 0" in done.stdout


def test_new_refuses_a_bad_name_and_an_existing_dir_and_leaves_nothing(tmp_path):
    bad = run_hsu("new", "hsu", "Calc!", "--dir", str(tmp_path))
    assert bad.returncode == 1
    assert "hsu: error: hsu new: NAME 'Calc!' must be lowercase letters" in bad.stderr
    # a package named like an installed module would shadow it
    shadow = run_hsu("new", "hsu", "grpc", "--dir", str(tmp_path))
    assert shadow.returncode == 1
    assert "NAME 'grpc' would shadow the module 'grpc'" in shadow.stderr
    (tmp_path / "calc").mkdir()
    taken = run_hsu("new", "hsu", "calc", "--dir", str(tmp_path))
    assert taken.returncode == 1
    assert f"{tmp_path / 'calc'} already exists" in taken.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calc"]
    assert not any((tmp_path / "calc").iterdir())


def test_the_node_template_ships_the_same_sdk_and_packages_as_the_node_echo():
    """One Node SDK: the template's copy is contrib/hsu-echo-node's."""
    sdk = (TEMPLATES / "hsu-node" / "lib" / "hsu.js.tmpl").read_text()
    assert sdk == (NODE_HSU / "lib" / "hsu.js").read_text()
    template_lock = json.loads((TEMPLATES / "hsu-node" / "package-lock.json.tmpl").read_text())
    echo_lock = json.loads((NODE_HSU / "package-lock.json").read_text())
    del template_lock["packages"][""], echo_lock["packages"][""]
    assert template_lock["packages"] == echo_lock["packages"]
    template_pkg = json.loads((TEMPLATES / "hsu-node" / "package.json.tmpl").read_text())
    echo_pkg = json.loads((NODE_HSU / "package.json").read_text())
    assert template_pkg["dependencies"] == echo_pkg["dependencies"]
