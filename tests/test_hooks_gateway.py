"""hsu_kernel_address: a data plane takes the kernel's address and moves the
kernel's own gRPC server elsewhere, with a real kernel, a real HSU and real gRPC."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest

import hsu
from hsu.core.v1 import core_pb2, core_pb2_grpc
from hsu.testing import build_kernel
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


async def info(address: str) -> core_pb2.InfoResponse:
    """The kernel's Core.Info, asked over gRPC at ``address`` (its control plane)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply: core_pb2.InfoResponse = await core_pb2_grpc.CoreStub(channel).Info(
            core_pb2.InfoRequest(), timeout=10
        )
        return reply


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


async def test_a_plane_registered_in_configure_moves_the_kernels_data_plane_where_it_says(
    tmp_path,
):
    private = f"unix:{tmp_path}/kernel.sock"
    asked: list[str] = []

    class Plane:
        """Per-kernel state, as a data plane keeps it."""

        @hsu.hookimpl
        def hsu_kernel_address(self, kernel, requested):
            asked.append(requested)
            return private

    class Gateway:
        @hsu.hookimpl
        def hsu_kernel_configure(self, kernel):
            kernel.register_plugin(Plane(), "test.plane")

    class Abstains:
        @hsu.hookimpl
        def hsu_kernel_address(self, kernel, requested):
            asked.append(f"abstained {requested}")

    requested = f"127.0.0.1:{free_port()}"
    unit = {
        "command": ["python", "-m", "hsu_echo"],
        "interfaces": [ECHO],
        "start": "at-start",
        "startup_timeout": 20,
    }
    kernel = build_kernel(
        {"units": {"echo": unit}},
        plugins=[Abstains(), Gateway()],
        address=requested,
        base_dir=str(tmp_path),
    )
    # asked once, as the kernel was built: the plane registered in configure
    # answered first (registered last), so the one that abstains was not asked
    assert asked == [requested]
    assert kernel.requested_address == requested
    assert kernel.bind_address == private
    await kernel.start()
    try:
        assert kernel.address == private
        # the gateway serves there: the unit's interface, not the kernel's Core
        async with grpc.aio.insecure_channel(private) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Echo(
                echo_pb2.EchoRequest(message="moved"), timeout=10
            )
            assert reply.message == "moved"
        # nothing of the kernel's on the address asked for: the plane's to take
        assert not listening(requested)
        # the HSU was given the control plane, which did not move, and
        # registered there
        [inst] = [i for i in kernel.instances.values() if i.unit == "echo"]
        assert inst.state is hsu.InstanceState.READY
        assert environ(inst.pid)["HSU_KERNEL_ADDRESS"] == kernel.control_address
        reply = await info(kernel.control_address)
        assert reply.unit == "kernel" and reply.pid == kernel.pid
    finally:
        await kernel.stop()
    assert kernel.plugin("test.plane") is None  # went with the kernel
    assert asked == [requested]


async def test_no_answer_leaves_the_kernel_on_the_address_asked_for(tmp_path):
    asked: list[str] = []

    class Abstains:
        @hsu.hookimpl
        def hsu_kernel_address(self, kernel, requested):
            asked.append(requested)

    requested = f"127.0.0.1:{free_port()}"
    kernel = build_kernel({}, plugins=[Abstains()], address=requested, base_dir=str(tmp_path))
    assert asked == [requested] and kernel.bind_address == requested
    await kernel.start()
    try:
        assert kernel.address == requested
        assert listening(requested)
        assert (await info(kernel.control_address)).address == kernel.control_address
    finally:
        await kernel.stop()
