"""Keep the hook contract honest: every hookspec documented and exercised."""

import inspect
import re
from pathlib import Path

import pytest

from hsu import hookspecs

ROOT = Path(__file__).resolve().parent.parent
SPECS = {
    name: fn
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("hsu_")
}


def test_there_are_hooks():
    assert len(SPECS) >= 8


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hookspec_has_a_docstring_with_its_parameters(name):
    doc = inspect.getdoc(SPECS[name]) or ""
    assert doc, f"{name} has no docstring"
    for arg in inspect.signature(SPECS[name]).parameters:
        assert f":param {arg}:" in doc, f"{name} does not document {arg}"


def _documented():
    text = (ROOT / "docs" / "hooks.md").read_text()
    return {m[0]: [a.strip() for a in m[1].split(",") if a.strip()]
            for m in re.findall(r"^### (hsu_\w+)\(([^)]*)\)", text, re.M)}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hookspec_is_in_the_reference_with_its_signature(name):
    documented = _documented()
    assert name in documented, f"docs/hooks.md has no '### {name}(...)' section"
    assert documented[name] == list(inspect.signature(SPECS[name]).parameters)


def test_the_reference_documents_no_hook_that_does_not_exist():
    assert set(_documented()) <= set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hookspec_is_exercised_by_a_test(name):
    here = Path(__file__).name
    users = [
        p.name
        for p in (ROOT / "tests").glob("test_*.py")
        if p.name != here and re.search(rf"def {name}\(", p.read_text())
    ]
    assert users, f"no test implements {name}"


def test_an_hsu_importing_the_sdk_does_not_load_the_kernel():
    import subprocess
    import sys

    kernel_side = ["hsu._kernel.kernel", "hsu._kernel.supervision.supervisor",
                   "hsu._kernel.config.model", "hsu._kernel.plugins",
                   "psutil", "cattrs", "yaml"]  # fmt: skip
    code = (
        f"import sys, hsu.worker; print(','.join(m for m in {kernel_side!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_importing_hsu_loads_no_plugin_machinery_until_hookimpl_is_used():
    import subprocess
    import sys

    heavy = ["pluggy", "hsu.hookspecs", "importlib.metadata"]
    code = (
        f"import sys, hsu; print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
        "from hsu import hookimpl\n"
        "import hsu.hookspecs, pluggy\n"
        "assert hookimpl is hsu.hookimpl is hsu.hookspecs.hookimpl\n"
        "assert isinstance(hookimpl, pluggy.HookimplMarker) and hookimpl.project_name == 'hsu'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_public_names_resolve_on_first_use():
    import hsu
    import hsu._kernel.kernel

    assert hsu.Kernel is hsu._kernel.kernel.Kernel
    assert set(hsu.__all__) <= set(dir(hsu))
    for name in hsu.__all__:
        assert getattr(hsu, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Kernal'"):
        hsu.Kernal  # noqa: B018
