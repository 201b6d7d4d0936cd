"""The committed generated code is exactly what the .proto files produce."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("grpc_tools")
pytest.importorskip("mypy_protobuf")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_protos(tmp_path):
    gen = _generator()
    fresh = gen.generate(tmp_path)
    assert fresh, "no .proto files found"
    rels = {p.relative_to(tmp_path) for p in fresh}
    # both trees: the kernel's contracts, and the demo's Echo next to hsu_echo
    assert Path("kernel/hsu/core/v1/core_pb2.py") in rels
    assert Path("contrib/hsu-echo/hsu_echo/v1/echo_pb2_grpc.py") in rels
    drifted = []
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            drifted.append(str(rel))
    assert not drifted, f"regenerate with `nox -s proto`: {drifted}"
    # and nothing generated is committed for a .proto that no longer exists
    committed = {
        p.relative_to(ROOT)
        for tree in gen.TREES
        for p in (ROOT / tree.out).rglob("*_pb2*.py*")
        if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }
    assert committed == {r for r in rels if r.suffix != ".proto"}
    # the .proto copies beside the code and in the Node.js HSU are checked above too
    assert Path("kernel/hsu/core/v1/core.proto") in rels
    assert Path("contrib/hsu-echo-node/proto/hsu_echo/v1/echo.proto") in rels
