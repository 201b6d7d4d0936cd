"""The v1 protos change only as docs/compatibility.md allows: checked against
proto/v1.lock.json by scripts/proto_lock.py."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _lock_script():
    spec = importlib.util.spec_from_file_location("proto_lock", ROOT / "scripts" / "proto_lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["proto_lock"] = module
    spec.loader.exec_module(module)
    return module


def test_the_v1_protos_break_nothing_and_the_lock_records_them():
    lock = _lock_script()
    recorded = json.loads(lock.LOCK.read_text())
    now = lock.current()
    assert lock.breaking(recorded, now) == []
    assert recorded == now, "an addition not recorded: run python scripts/proto_lock.py"


def test_the_check_catches_each_forbidden_change_and_lets_additions_pass():
    lock = _lock_script()
    was = lock.current()
    register = ("hsu/kernel/v1/kernel.proto", "hsu.kernel.v1.RegisterRequest")

    def changed(edit):
        now = copy.deepcopy(was)
        edit(now["hsu/kernel/v1/kernel.proto"], now)
        return lock.breaking(was, now)

    def message(proto):
        return proto["messages"][register[1]]

    def retype(proto, _):
        message(proto)["fields"]["1"][1] = "TYPE_BYTES"

    def remove(proto, _):
        del message(proto)["fields"]["1"]

    def reserve(proto, _):
        name = message(proto)["fields"].pop("1")[0]
        message(proto)["reserved_numbers"].append([1, 2])
        message(proto)["reserved_names"].append(name)

    def add(proto, _):
        message(proto)["fields"]["999"] = ["added", "TYPE_STRING", "LABEL_OPTIONAL", "", None]

    def drop_rpc(proto, _):
        del proto["services"]["hsu.kernel.v1.Kernel"]["Register"]

    assert any("field 1 changed" in p for p in changed(retype))
    assert any("removed without reserving" in p for p in changed(remove))
    assert changed(reserve) == []
    assert changed(add) == []
    assert changed(drop_rpc) == [f"{register[0]}: rpc hsu.kernel.v1.Kernel/Register removed"]

    # a number retired (reserved) earlier cannot come back under any name
    retired = copy.deepcopy(was)
    reserve(retired["hsu/kernel/v1/kernel.proto"], retired)
    back = copy.deepcopy(retired)
    message(back["hsu/kernel/v1/kernel.proto"])["fields"]["1"] = [
        "other", "TYPE_STRING", "LABEL_OPTIONAL", "", None
    ]  # fmt: skip
    assert any("reuses a retired number" in p for p in lock.breaking(retired, back))
