"""Record the v1 protos' wire shape in proto/v1.lock.json, and check a change
against it (docs/compatibility.md).

The record: for every .proto under proto/hsu/*/v1/, each message's fields
(number -> name, type, label, message or enum type), its reserved numbers and
names; each enum's values; each service's methods (request, reply, and
whether each streams). Read from the generated modules' descriptors, so it is
what the committed code puts on the wire.

    python scripts/proto_lock.py           # record (after an allowed change)
    python scripts/proto_lock.py --check   # list the changes v1 forbids

``tests/test_proto_compat.py`` runs the check and fails on a forbidden
change, or on a lock file that does not record the protos as they are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "proto" / "v1.lock.json"


def _module(proto: Path) -> str:
    """``proto/hsu/kernel/v1/kernel.proto`` -> ``hsu.kernel.v1.kernel_pb2``."""
    rel = proto.relative_to(ROOT / "proto").with_suffix("")
    return ".".join(rel.parts) + "_pb2"


def _messages(prefix: str, messages: Any, out: dict[str, Any], enums: dict[str, Any]) -> None:
    for m in messages:
        name = f"{prefix}.{m.name}"
        out[name] = {
            "fields": {
                str(f.number): [
                    f.name,
                    descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                    descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
                    f.type_name,
                    f.oneof_index if f.HasField("oneof_index") else None,
                ]
                for f in m.field
            },
            # [start, end) ranges: ``reserved 100 to max`` stays two numbers
            "reserved_numbers": sorted([r.start, r.end] for r in m.reserved_range),
            "reserved_names": sorted(m.reserved_name),
        }
        _enums(name, m.enum_type, enums)
        _messages(name, m.nested_type, out, enums)


def _enums(prefix: str, enum_types: Any, out: dict[str, Any]) -> None:
    for e in enum_types:
        out[f"{prefix}.{e.name}"] = {str(v.number): v.name for v in e.value}


def current() -> dict[str, Any]:
    """The wire shape of every v1 proto, as the committed generated code has it."""
    sys.path.insert(0, str(ROOT / "kernel"))
    shape: dict[str, Any] = {}
    for proto in sorted((ROOT / "proto").glob("hsu/*/v1/*.proto")):
        module = importlib.import_module(_module(proto))
        fd = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        messages: dict[str, Any] = {}
        enums: dict[str, Any] = {}
        _messages(fd.package, fd.message_type, messages, enums)
        _enums(fd.package, fd.enum_type, enums)
        services = {
            f"{fd.package}.{s.name}": {
                m.name: [m.input_type, m.output_type, m.client_streaming, m.server_streaming]
                for m in s.method
            }
            for s in fd.service
        }
        rel = str(proto.relative_to(ROOT / "proto"))
        shape[rel] = {"messages": messages, "enums": enums, "services": services}
    return shape


def _reserved(ranges: list[list[int]], number: int) -> bool:
    return any(start <= number < end for start, end in ranges)


def breaking(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The changes from ``old`` to ``new`` that v1 forbids, one line each."""
    problems: list[str] = []
    for path, was in old.items():
        now = new.get(path)
        if now is None:
            problems.append(f"{path}: removed")
            continue
        for name, msg in was["messages"].items():
            cur = now["messages"].get(name)
            if cur is None:
                problems.append(f"{path}: message {name} removed")
                continue
            for number, field in msg["fields"].items():
                got = cur["fields"].get(number)
                if got is None:
                    if not _reserved(cur["reserved_numbers"], int(number)) or (
                        field[0] not in cur["reserved_names"]
                    ):
                        problems.append(
                            f"{path}: {name} field {number} ({field[0]}) removed without"
                            f" reserving its number and name"
                        )
                elif got != field:
                    problems.append(f"{path}: {name} field {number} changed: {field} -> {got}")
            for number, field in cur["fields"].items():
                if number not in msg["fields"] and _reserved(msg["reserved_numbers"], int(number)):
                    problems.append(
                        f"{path}: {name} field {number} ({field[0]}) reuses a retired number"
                    )
            for start, end in msg["reserved_numbers"]:
                if not all(_reserved(cur["reserved_numbers"], n) for n in (start, end - 1)):
                    problems.append(f"{path}: {name} reserved numbers {start}..{end - 1} released")
        for name, values in was["enums"].items():
            cur_values = now["enums"].get(name)
            if cur_values is None:
                problems.append(f"{path}: enum {name} removed")
                continue
            for number, value in values.items():
                if cur_values.get(number) != value:
                    problems.append(f"{path}: enum {name} value {number} ({value}) changed")
        for service, methods in was["services"].items():
            cur_methods = now["services"].get(service)
            if cur_methods is None:
                problems.append(f"{path}: service {service} removed")
                continue
            for method, signature in methods.items():
                got = cur_methods.get(method)
                if got is None:
                    problems.append(f"{path}: rpc {service}/{method} removed")
                elif got != signature:
                    problems.append(f"{path}: rpc {service}/{method} changed: {signature} -> {got}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list forbidden changes only")
    args = parser.parse_args()
    shape = current()
    if args.check:
        problems = breaking(json.loads(LOCK.read_text()), shape)
        for p in problems:
            print(p)
        return 1 if problems else 0
    if LOCK.exists():
        problems = breaking(json.loads(LOCK.read_text()), shape)
        if problems:
            print("not recorded: v1 forbids these changes (docs/compatibility.md):")
            for p in problems:
                print(" ", p)
            return 1
    LOCK.write_text(json.dumps(shape, indent=1, sort_keys=True) + "\n")
    print(f"recorded {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
