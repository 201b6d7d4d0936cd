"""The public boundary: plugins and contrib use only the public API of hsu.

Public is told apart by the path (pytest's ``_pytest``, Ray Serve's
``_private``): a module of ``hsu`` whose dotted path has a component starting
with ``_`` is private. docs/plugins.md lists every public module; these tests
keep the code, the list and the hooks honest.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import hsu.ports

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "kernel"
THIRD_PARTY_LIKE = [ROOT / "plugins", ROOT / "contrib"]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"


def _python_files(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if ".venv" not in path.parts and "build" not in path.parts:
                yield path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module a file imports, at any depth (function-local imports too),
    and every string passed to ``importlib.import_module``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # `from hsu import _kernel`
                yield node.lineno, f"{node.module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _is_private(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "hsu" and any(p.startswith("_") and p != "__init__" for p in parts[1:])


def _documented_public_modules() -> set[str]:
    text = PLUGINS_DOC.read_text()
    block = re.search(r"<!-- public-modules.*?-->(.*?)<!-- /public-modules -->", text, re.S)
    assert block, "docs/plugins.md lost its public-modules table"
    return set(re.findall(r"^\| `(hsu(?:\.[a-z0-9_]+)*)` \|", block.group(1), re.M))


def _public_modules_in_tree() -> set[str]:
    """Public modules of ``hsu``; generated ``*_pb2*`` modules count as their package."""
    found = set()
    for path in (KERNEL / "hsu").rglob("*.py"):
        rel = path.relative_to(KERNEL).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and not any(
            p.suffix == ".py" and p.name != "__init__.py" for p in path.parent.iterdir()
        ):
            continue  # a package that only holds packages (hsu.core holds v1)
        if parts[-1] in ("__init__", "__main__") or parts[-1].endswith(("_pb2", "_pb2_grpc")):
            parts = parts[:-1]
        module = ".".join(parts)
        if not _is_private(module) and not any(p.startswith("_") for p in parts[1:]):
            found.add(module)
    return found


def test_plugins_and_contrib_never_import_private_modules() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in _python_files(*THIRD_PARTY_LIKE)
        for line, module in _imports(path)
        if _is_private(module)
    ]
    assert offenders == [], "plugins/contrib must use only the public API:\n" + "\n".join(offenders)


def test_plugins_and_contrib_import_only_documented_modules_of_hsu() -> None:
    public = _documented_public_modules()

    def documented(name: str) -> bool:
        if _module_path(name) is not None:  # a module: it, or its generated package
            return name in public or name.rsplit(".", 1)[0] in public
        return name.rsplit(".", 1)[0] in public  # a name from a documented module

    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}, not in docs/plugins.md"
        for path in _python_files(*THIRD_PARTY_LIKE)
        for line, module in _imports(path)
        if module.split(".")[0] == "hsu" and module != "hsu" and not documented(module)
    ]
    assert offenders == [], "\n".join(offenders)


def _module_path(name: str) -> Path | None:
    base = KERNEL.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_every_public_module_is_documented_and_every_documented_one_exists() -> None:
    documented = _documented_public_modules()
    in_tree = _public_modules_in_tree()
    assert sorted(in_tree - documented) == [], "public modules missing from docs/plugins.md"
    assert sorted(documented - in_tree) == [], "docs/plugins.md names modules that do not exist"


def test_the_checker_sees_a_private_import(tmp_path: Path) -> None:
    """The scan above must catch each form a plugin could use."""
    sample = tmp_path / "p.py"
    sample.write_text(
        "import hsu._kernel.kernel\n"
        "from hsu._kernel import plugins\n"
        "from hsu import _kernel\n"
        "def f():\n"
        "    from hsu._kernel.routing import x\n"
        "    importlib.import_module('hsu._kernel.cli')\n"
        "from hsu.ports import KernelAPI\n"
    )
    private = {m for _, m in _imports(sample) if _is_private(m)}
    assert private == {
        "hsu._kernel",
        "hsu._kernel.kernel",
        "hsu._kernel.plugins",
        "hsu._kernel.routing",
        "hsu._kernel.routing.x",
        "hsu._kernel.cli",
    }


# -- the hooks' types ----------------------------------------------------------

_ALLOWED_OUTSIDE_PORTS = {
    # builtins and typing: not hsu's types
    "None",
    "str",
    "int",
    "float",
    "bool",
    "type",
    "object",
    "list",
    "dict",
    "tuple",
    "Any",
    "Callable",
    "Awaitable",
    "Iterable",
    "Mapping",
    "Sequence",
}


def _hookspec_functions() -> list[ast.FunctionDef]:
    tree = ast.parse((KERNEL / "hsu" / "hookspecs.py").read_text())
    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("hsu_")
    ]


def _names_in_annotation(annotation: ast.expr) -> set[str]:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}


def test_every_hookspec_type_comes_from_hsu_ports() -> None:
    specs = _hookspec_functions()
    assert len(specs) >= 10
    outside = {}
    for spec in specs:
        annotations = [a.annotation for a in spec.args.args if a.annotation is not None]
        if spec.returns is not None:
            annotations.append(spec.returns)
        names = set().union(*(_names_in_annotation(a) for a in annotations))
        foreign = names - _ALLOWED_OUTSIDE_PORTS - set(hsu.ports.__all__)
        if foreign:
            outside[spec.name] = sorted(foreign)
    assert outside == {}, "hook argument types must come from hsu.ports"


def test_hookspecs_import_hsu_types_only_from_ports() -> None:
    path = KERNEL / "hsu" / "hookspecs.py"
    modules = {m for _, m in _imports(path) if m.split(".")[0] == "hsu"}
    assert modules <= {"hsu.ports"} | {f"hsu.ports.{n}" for n in hsu.ports.__all__}


@pytest.mark.parametrize("name", sorted(hsu.ports.__all__))
def test_every_name_hsu_ports_exports_resolves(name: str) -> None:
    assert getattr(hsu.ports, name) is not None


def test_the_kernel_implements_kernel_api_and_hooks_receive_it() -> None:
    """What plugins are promised is what they get, checked at run time too."""
    import hsu
    from hsu.ports import KernelAPI

    kernel = hsu.Kernel.from_deployment(hsu.deployment_from_dict({"units": {}}), autoload=False)
    assert isinstance(kernel, KernelAPI)
