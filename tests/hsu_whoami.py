"""A test HSU serving hsu.echo.v1.Echo whose reply says who called.

``Echo`` answers with JSON: ``identity`` (what :func:`hsu.worker.identity`
verified, or null) and ``headers`` (every ``hsu-identity*`` metadata value
that reached the HSU), so a test sees both the verified identity and that a
caller's forged header did not get through.
"""

from __future__ import annotations

import json
from typing import Any

from hsu import worker
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc


class WhoAmI(echo_pb2_grpc.EchoServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        ident = worker.identity(context)
        headers = [
            [k, v if isinstance(v, str) else v.decode("latin-1")]
            for k, v in context.invocation_metadata() or ()
            if k.startswith("hsu-identity") or k == "authorization"
        ]
        body = {
            "identity": None
            if ident is None
            else {"name": ident.name, "kind": ident.kind, "roles": list(ident.roles)},
            "headers": headers,
        }
        return echo_pb2.EchoResponse(message=json.dumps(body))


if __name__ == "__main__":
    worker.run(WhoAmI(), version="1")
