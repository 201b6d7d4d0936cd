"""A test HSU serving hsu.echo.v1.Echo that runs cache calls through
``worker.cache`` (docs/cache.md), as a real HSU would.

``Echo``'s message is JSON: ``{"op": "get"|"set"|"delete", "ns": NAMESPACE,
"key": KEY, "value": TEXT, "repeat": N, "ttl": S}``; the reply is JSON with
the result, or ``{"error": ERROR_CLASS, "message": ...}``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hsu import worker
from hsu.cache import CacheClient
from hsu.errors import HsuError
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class CacheOps(echo_pb2_grpc.EchoServicer):
    w: worker.Worker

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        cmd = json.loads(request.message)
        cache: CacheClient = self.w.cache
        if cmd.get("ns"):
            cache = CacheClient(self.w.kernel_address, token=self.w.token, namespace=cmd["ns"])
        try:
            op, key = cmd["op"], cmd["key"]
            out: Any
            if op == "get":
                hit = await cache.get(key)
                out = None if hit is None else hit.value.decode()
            elif op == "set":
                value = cmd["value"].encode() * cmd.get("repeat", 1)
                await cache.set(key, value, ttl=cmd.get("ttl"))
                out = True
            elif op == "delete":
                out = await cache.delete(key)
            else:
                raise ValueError(op)
            body = {"result": out}
        except HsuError as exc:
            body = {"error": type(exc).__name__, "message": str(exc)}
        finally:
            if cache is not self.w.cache:
                await cache.close()
        return echo_pb2.EchoResponse(message=json.dumps(body))


if __name__ == "__main__":
    ops = CacheOps()
    ops.w = worker.Worker(ops, version="1")
    asyncio.run(ops.w.serve())
