"""What a C data plane would give the gateway: nginx's grpc_pass in front of
one echo HSU, against calling the HSU directly (not part of ``nox -s bench``).

The Python gateway is CPU-bound on a 2-CPU box (docs/benchmarks.md, Routing).
This measures the alternative before building it: ``python bench/nginx_floor.py``
needs ``nginx`` (Debian: ``apt-get install nginx-light``) on PATH. It runs
an echo HSU standalone and nginx (one worker, HTTP/2, keepalive upstream) on
loopback, then calls ``Echo`` with 1 and 32 calls in flight, direct and
through nginx, alternating, 3 rounds of 1.5 s each, and prints calls/s and the
ratio per round. Both processes are stopped by pid at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

ROUNDS, SECONDS, WARMUP = 3, 1.5, 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_conf(tmp: Path, upstream: int, listen: int) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  upstream echo {{ server 127.0.0.1:{upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{listen} http2;
    location /hsu.echo.v1.Echo/ {{ grpc_pass grpc://echo; }}
  }}
}}
"""


async def rate(address: str, inflight: int, seconds: float) -> float:
    """Calls per second of ``inflight`` tasks calling Echo in a loop."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for _ in range(WARMUP):
            await stub.Echo(echo_pb2.EchoRequest(message="warm"), timeout=10)
        done = 0
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return done / seconds


def main() -> int:
    nginx = shutil.which("nginx")
    if nginx is None:
        print("nginx is not on PATH (Debian: apt-get install nginx-light)", file=sys.stderr)
        return 2
    hsu_port, nginx_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, hsu_port, nginx_port))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSU_")}
        env["HSU_LISTEN"] = f"127.0.0.1:{hsu_port}"
        hsu = subprocess.Popen([sys.executable, "-m", "hsu_echo"], env=env,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        proxy = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf")])
        try:
            time.sleep(1.5)
            for inflight in (1, 32):
                for r in range(ROUNDS):
                    direct = asyncio.run(rate(f"127.0.0.1:{hsu_port}", inflight, SECONDS))
                    proxied = asyncio.run(rate(f"127.0.0.1:{nginx_port}", inflight, SECONDS))
                    print(f"{inflight:>2} in flight, round {r + 1}: direct {direct:,.0f}/s,"
                          f" nginx {proxied:,.0f}/s, {proxied / direct:.2f}x")  # fmt: skip
        finally:
            for p in (proxy, hsu):
                p.terminate()
            for p in (proxy, hsu):
                p.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
