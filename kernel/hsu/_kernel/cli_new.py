"""``hsu new``: a package that passes its own tests the moment it is made.

``hsu new hsu NAME [--lang python|node]`` makes an HSU (a .proto, its code
generation, the servicer, a deployment, tests); ``hsu new plugin NAME`` an
hsu plugin distribution (hookimpls, settings, an entry point, tests). The
templates are plain files under ``templates/`` (package data) whose
``__NAME__``-style placeholders are replaced; a file named ``x.tmpl`` becomes
``x``, and ``gitignore``/``npmrc`` become dot-files.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from hsu._version import __version__
from hsu.errors import HsuError

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: a name: what a Python package, an npm package and a proto package all accept
NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
MAX_NAME = 40
DOTFILES = {"gitignore", "npmrc"}
#: where the installed hsu keeps the contracts a Node HSU loads
KERNEL_PROTOS = ("hsu/core/v1/core.proto", "hsu/kernel/v1/kernel.proto")


def _check_name(name: str, module: str) -> str:
    """``name`` follows the grammar, and ``module`` (the Python package it
    makes) would not shadow an installed or standard one."""
    if len(name) > MAX_NAME or not NAME.fullmatch(name):
        raise HsuError(
            f"hsu new: NAME {name!r} must be lowercase letters and digits, words joined by"
            f" '-' or '_', starting with a letter, at most {MAX_NAME} characters (e.g. calc,"
            " order-book)"
        )
    taken = module in {"test", "tests", "google"} or importlib.util.find_spec(module) is not None
    if taken:
        raise HsuError(
            f"hsu new: NAME {name!r} would shadow the module {module!r} (installed or"
            " standard); pick another"
        )
    return name


def placeholders(name: str) -> dict[str, str]:
    pkg = name.replace("-", "_")
    service = "".join(part.capitalize() for part in re.split(r"[-_]", name))
    return {
        "__NAME__": name,
        "__PKG__": pkg,
        "__SERVICE__": service,
        "__INTERFACE__": f"{pkg}.v1.{service}",
        "__HSU_VERSION__": __version__,
        "__GRPCIO__": _version("grpcio-tools", fallback=_version("grpcio")),
        "__PROTOBUF__": _version("protobuf"),
    }


def _version(dist: str, fallback: str = "0") -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return fallback


def _substitute(text: str, values: dict[str, str]) -> str:
    # longest first: __PKG__ inside a longer placeholder never matches early
    for key in sorted(values, key=len, reverse=True):
        text = text.replace(key, values[key])
    return text


def render(template: str, dest: Path, values: dict[str, str]) -> list[Path]:
    """Write ``templates/<template>`` to ``dest`` (which must not exist)."""
    source = TEMPLATES / template
    written = []
    for path in sorted(source.rglob("*.tmpl")):
        rel = path.relative_to(source).with_suffix("")  # drop .tmpl
        parts = [_substitute(p, values) for p in rel.parts]
        if parts[-1] in DOTFILES:
            parts[-1] = "." + parts[-1]
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_substitute(path.read_text(), values))
        written.append(target)
    return written


def _kernel_protos(dest: Path) -> None:
    """Core's and the Kernel API's .proto, from the installed hsu (a Node HSU
    serves the one and calls the other)."""
    kernel_pkg = Path(__file__).resolve().parent.parent  # hsu/
    for rel in KERNEL_PROTOS:
        source = kernel_pkg.parent / rel
        if not source.is_file():
            raise HsuError(f"hsu new: {source} is missing from the installed hsu")
        target = dest / "proto" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def new(kind: str, name: str, *, lang: str = "python", into: Path | None = None) -> Path:
    """Make the package; returns its directory."""
    pkg = name.replace("-", "_")
    _check_name(name, f"hsu_plugin_{pkg}" if kind == "plugin" else pkg)
    values = placeholders(name)
    base = Path.cwd() if into is None else into
    if kind == "plugin":
        dest, template = base / f"hsu-plugin-{name}", "plugin"
    else:
        dest, template = base / name, f"hsu-{lang}"
    if dest.exists():
        raise HsuError(f"hsu new: {dest} already exists; pick another NAME or --dir")
    if template == "hsu-python" and importlib.util.find_spec("grpc_tools") is None:
        raise HsuError(
            "hsu new hsu --lang python: grpcio-tools generates the code from the .proto and"
            f" is not installed: pip install 'hsu[new]' (grpcio-tools=={values['__GRPCIO__']})"
        )
    try:
        render(template, dest, values)
        if template == "hsu-python":
            done = subprocess.run(
                [sys.executable, "gen_protos.py"],
                cwd=dest,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise HsuError(f"hsu new: code generation failed in {dest}:\n{done.stderr}")
        elif template == "hsu-node":
            _kernel_protos(dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # nothing half made is left behind
        raise
    return dest


NEXT_STEPS = {
    "hsu-python": "cd {dir} && python -m venv .venv && .venv/bin/pip install -e '.[test]'"
    " && .venv/bin/pytest",
    "hsu-node": "cd {dir} && npm ci && npm test",
    "plugin": "cd {dir} && python -m venv .venv && .venv/bin/pip install -e '.[test]'"
    " && .venv/bin/pytest",
}


def cmd_new(args: argparse.Namespace) -> int:
    lang = getattr(args, "lang", "python")
    dest = new(args.kind, args.name, lang=lang, into=Path(args.dir) if args.dir else None)
    template = "plugin" if args.kind == "plugin" else f"hsu-{lang}"
    print(f"created {dest}")
    print(f"next: {NEXT_STEPS[template].format(dir=dest)}")
    return 0
