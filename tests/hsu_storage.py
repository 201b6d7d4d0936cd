"""A test HSU serving hsu.echo.v1.Echo that runs storage calls through
``worker.storage`` (docs/storage.md), as a real HSU would.

``Echo``'s message is JSON: ``{"op": "get"|"put"|"delete"|"list"|"cas",
"ns": NAMESPACE, "key": KEY, "value": TEXT, "revision": N, "ttl": S,
"token": TOKEN}``; the reply is JSON with the result, or ``{"error":
ERROR_CLASS, "message": ...}``. ``token`` replaces the instance's own (an
attacker's guess).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hsu import worker
from hsu.errors import HsuError
from hsu.storage import StorageClient
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class StorageOps(echo_pb2_grpc.EchoServicer):
    w: worker.Worker

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        cmd = json.loads(request.message)
        store: StorageClient = self.w.storage
        if "token" in cmd:
            store = StorageClient(self.w.kernel_address, token=cmd["token"])
        ns, key = cmd.get("ns", ""), cmd.get("key", "")
        try:
            op = cmd["op"]
            if op == "get":
                kv = await store.get(ns, key)
                out: Any = None if kv is None else kv.value.decode()
            elif op == "put":
                value = cmd["value"].encode() * cmd.get("repeat", 1)
                out = (await store.put(ns, key, value, ttl=cmd.get("ttl"))).mod_revision
            elif op == "delete":
                out = await store.delete(ns, key)
            elif op == "list":
                items, _ = await store.list(ns, cmd.get("prefix", ""))
                out = {kv.key: kv.value.decode() for kv in items}
            elif op == "cas":
                value = None if cmd.get("value") is None else cmd["value"].encode()
                ok, kv = await store.compare_and_set(ns, key, value, cmd["revision"])
                out = [ok, None if kv is None else kv.mod_revision]
            elif op == "watch":
                got = []
                async with asyncio.timeout(10):
                    async for ev in store.watch(ns, cmd.get("prefix", ""), after=cmd["after"]):
                        got.append([ev.kind, ev.kv.key, ev.kv.value.decode()])
                        if len(got) == cmd["n"]:
                            break
                out = got
            else:
                raise ValueError(op)
            body = {"result": out}
        except HsuError as exc:
            body = {"error": type(exc).__name__, "message": str(exc)}
        finally:
            if store is not self.w.storage:
                await store.close()
        return echo_pb2.EchoResponse(message=json.dumps(body))


if __name__ == "__main__":
    ops = StorageOps()
    ops.w = worker.Worker(ops, version="1")
    asyncio.run(ops.w.serve())
