"""hsu.storage.v1.Storage on the control plane: an HSU reaches only its
unit's namespace (through worker.storage, in a real HSU process), an
operator names one, the kernel's own is refused to all, oversized values
are INVALID_ARGUMENT, and auth plugins decide for operators. That every
acknowledged put survives a SIGKILLed kernel is a contract test, run on
each storage (tests/test_storage_contract.py)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

import hsu
from conftest import ROOT, write_deployment
from hsu.errors import InvalidValue, NotAllowed, Unauthenticated
from hsu.storage import StorageClient
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

OPS = str(Path(__file__).with_name("hsu_storage.py"))
ECHO = "hsu.echo.v1.Echo"
ADMIN, KEEPER = (secrets.token_urlsafe(24) for _ in range(2))
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def units(**more: Any) -> dict[str, Any]:
    unit = {"command": [sys.executable, OPS], "interfaces": [ECHO], "start": "at-start",
            "stop_grace": 5}  # fmt: skip
    return {"a": dict(unit), "b": dict(unit), **more}


async def run(kernel: hsu.Kernel, unit: str, **cmd: Any) -> dict[str, Any]:
    """Have an instance of ``unit`` run one storage call through worker.storage."""
    (inst,) = [i for i in kernel.instances.values() if i.unit == unit]
    async with grpc.aio.insecure_channel(inst.address) as ch:
        reply = await echo_pb2_grpc.EchoStub(ch).Echo(
            echo_pb2.EchoRequest(message=json.dumps(cmd)), timeout=20
        )
    out: dict[str, Any] = json.loads(reply.message)
    return out


async def test_a_unit_reaches_only_its_own_namespace(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(
        {"name": "st", "units": units(), "storage": {"max_value_bytes": 1000}}
    )
    put = await run(kernel, "a", op="put", key="k", value="from a")
    assert isinstance(put["result"], int) and put["result"] > 0  # its revision
    got = await run(kernel, "a", op="get", key="k")
    assert got == {"result": "from a"}
    assert await run(kernel, "b", op="get", key="k") == {"result": None}  # its own is empty
    # the attack: b names a's namespace, or the kernel's
    stolen = await run(kernel, "b", op="get", ns="a", key="k")
    assert stolen["error"] == "NotAllowed"
    assert "unit 'b' may use its own namespace 'b' only, not 'a'" in stolen["message"]
    listed = await run(kernel, "b", op="list", ns="a")
    assert listed["error"] == "NotAllowed"
    overwrite = await run(kernel, "b", op="put", ns="a", key="k", value="from b")
    assert overwrite["error"] == "NotAllowed"
    kernels = await run(kernel, "b", op="list", ns="hsu.kernel")
    assert kernels["error"] == "NotAllowed"
    # a guessed token is no instance's
    guessed = await run(kernel, "b", op="get", ns="a", key="k", token="x" * 43)
    assert guessed["error"] == "Unauthenticated"
    assert "no live instance has this token" in guessed["message"]
    # nothing b tried reached a's key
    assert await run(kernel, "a", op="get", key="k") == {"result": "from a"}
    # an oversized value: INVALID_ARGUMENT, nothing written
    big = await run(kernel, "a", op="put", key="big", value="x", repeat=1001)
    assert big["error"] == "InvalidValue"
    assert "1001 bytes, over storage.max_value_bytes (1000)" in big["message"]
    assert await run(kernel, "a", op="get", key="big") == {"result": None}
    # compare-and-set and watch through the service
    rev = (await run(kernel, "a", op="put", key="lock", value="1"))["result"]
    stale = await run(kernel, "a", op="cas", key="lock", value="2", revision=rev - 1)
    assert stale["result"] == [False, rev]
    ok, new = (await run(kernel, "a", op="cas", key="lock", value="2", revision=rev))["result"]
    assert ok and new > rev
    watched = await run(kernel, "a", op="watch", prefix="lo", after=rev - 1, n=2)
    assert watched == {"result": [["put", "lock", "1"], ["put", "lock", "2"]]}


async def test_units_given_one_namespace_share_it(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(
        {"name": "sh", "units": units(), "storage": {"namespaces": {"a": "shop", "b": "shop"}}}
    )
    await run(kernel, "a", op="put", key="cart", value="3 apples")
    assert await run(kernel, "b", op="get", key="cart") == {"result": "3 apples"}
    assert (await run(kernel, "b", op="get", ns="b", key="cart"))["error"] == "NotAllowed"


async def test_an_operator_names_the_namespace_and_never_the_kernels(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory({"name": "op", "units": units()})
    await run(kernel, "a", op="put", key="k", value="v")
    client = StorageClient(kernel.control_address)
    try:
        kv = await client.get("a", "k")
        assert kv is not None and kv.value == b"v"
        with pytest.raises(InvalidValue, match="namespace: required"):
            await client.get("", "k")
        with pytest.raises(NotAllowed, match=r"'hsu\.kernel' is the kernel's own"):
            await client.list("hsu.kernel")
    finally:
        await client.close()


def _auth(grants: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "sa",
        "auth": {"authenticators": ["token"], "authorizers": ["rbac"]},
        "token": {
            "tokens": [
                {"identity": "admin", "token": ADMIN, "roles": ["read", "control", "admin"]},
                {"identity": "keeper", "token": KEEPER},
            ]
        },
        "rbac": {"grants": grants},
        "units": units(),
    }


async def test_with_auth_on_the_authorizers_decide_per_namespace(hsu_kernel_factory) -> None:
    kernel = await hsu_kernel_factory(
        _auth([{"identity": "keeper", "roles": ["storage"], "units": ["a"]}])
    )
    # the HSUs still reach their own, and only that
    await run(kernel, "a", op="put", key="k", value="secret of a")
    assert (await run(kernel, "b", op="get", ns="a", key="k"))["error"] == "NotAllowed"
    keeper = StorageClient(kernel.control_address)
    keeper._metadata = (("authorization", f"Bearer {KEEPER}"),)
    admin = StorageClient(kernel.control_address)
    admin._metadata = (("authorization", f"Bearer {ADMIN}"),)
    anonymous = StorageClient(kernel.control_address)
    try:
        kv = await keeper.get("a", "k")
        assert kv is not None and kv.value == b"secret of a"
        with pytest.raises(NotAllowed, match="keeper may not call it: it needs role 'storage'"):
            await keeper.get("b", "k")
        with pytest.raises(NotAllowed, match="it needs role 'storage'"):
            await admin.get("a", "k")  # admin of the kernel, not of its data
        with pytest.raises(Unauthenticated):
            await anonymous.get("a", "k")
    finally:
        for c in (keeper, admin, anonymous):
            await c.close()


def test_another_user_cannot_reach_the_storage(tmp_path, kernel_process) -> None:
    path = write_deployment(tmp_path / "d.yaml", "name: nb\nunits: {}\n")
    k = kernel_process(path)
    k.wait_ready()
    code = (
        "import grpc, sys\n"
        "from hsu.storage.v1 import storage_pb2, storage_pb2_grpc\n"
        "ch = grpc.insecure_channel(sys.argv[1])\n"
        "try:\n"
        "    storage_pb2_grpc.StorageStub(ch).List(storage_pb2.ListRequest(namespace='a'),"
        " timeout=5)\n"
        "    print('READ')\n"
        "except grpc.RpcError as e:\n"
        "    print('REFUSED', e.code().name, e.details())\n"
    )
    tmp_path.chmod(0o755)
    try:
        out = subprocess.run(
            [*NOBODY, sys.executable, "-c", code, k.address],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        tmp_path.chmod(0o700)
    assert "READ" not in out.stdout
    assert out.stdout.startswith("REFUSED UNAVAILABLE"), (out.stdout, out.stderr)
    assert "ermission denied" in out.stdout
