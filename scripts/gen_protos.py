"""Generate Python code and type stubs from the .proto files, next to the
package that ships them.

Two trees: the kernel's contracts (proto/ -> kernel/, distribution ``hsu``)
and the demo's Echo interface (contrib/hsu-echo/proto/ -> contrib/hsu-echo/,
distribution ``hsu-echo``). Run through ``nox -s proto``.

Each .proto is also copied next to the code made from it, so an installed
package carries its contract (``hsu new hsu --lang node`` copies Core's and the
Kernel API's from the installed ``hsu``), and into the Node.js HSU
(contrib/hsu-echo-node/proto/), which loads them at run time.
``tests/test_generated_code.py`` runs this into a temporary folder and fails
when the committed files differ, so the .proto files and the code made from
them cannot drift apart.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class Tree(NamedTuple):
    """Where a distribution's .proto files are, and where its code goes (both
    relative to the repository root, so ``--out`` mirrors the layout)."""

    protos: Path
    out: Path


TREES = (
    Tree(Path("proto"), Path("kernel")),
    Tree(Path("contrib/hsu-echo/proto"), Path("contrib/hsu-echo")),
)


#: the Node.js HSU loads these .proto files at run time (@grpc/proto-loader)
NODE_PROTOS = Path("contrib/hsu-echo-node/proto")


def copies() -> list[tuple[Path, Path]]:
    """(source, destination) of every .proto copied, both relative to the root."""
    found: list[tuple[Path, Path]] = []
    for tree in TREES:
        for proto in proto_files(tree):
            rel = proto.relative_to(ROOT / tree.protos)
            found.append((tree.protos / rel, tree.out / rel))
            found.append((tree.protos / rel, NODE_PROTOS / rel))
    return found


def proto_files(tree: Tree) -> list[Path]:
    return sorted((ROOT / tree.protos).rglob("*.proto"))


def generated_files(out: Path) -> list[Path]:
    """The files ``generate(out)`` writes, with ``out`` in place of the root."""
    found: list[Path] = []
    for tree in TREES:
        for proto in proto_files(tree):
            rel = proto.relative_to(ROOT / tree.protos).with_suffix("")
            found.extend(out / tree.out / rel.parent / f"{rel.name}{s}" for s in SUFFIXES)
    found.extend(out / dest for _, dest in copies())
    return found


def _plugin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install mypy-protobuf (pip install -e '.[dev]')")
    return found


def generate(out: Path = ROOT) -> list[Path]:
    """Write every tree's code under ``out`` (the repository root by default)."""
    for tree in TREES:
        proto_root = ROOT / tree.protos
        dest = out / tree.out
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={dest}",
            f"--grpc_python_out={dest}",
            f"--mypy_out={dest}",
            f"--mypy_grpc_out={dest}",
            *(str(p.relative_to(proto_root)) for p in proto_files(tree)),
        ]
        subprocess.run(cmd, check=True, cwd=proto_root)
    for source, dest in copies():
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / source, out / dest)
    return generated_files(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT,
        help="write here instead of the repository, as DIR/kernel/... and DIR/contrib/hsu-echo/...",
    )
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
