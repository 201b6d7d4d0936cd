"""``--log-format json`` / ``kernel.log_format``: the kernel's and its HSUs'
records as JSON lines (loguru's serializer), read back from a real kernel run."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import HSU, ROOT, hsu_env, run_hsu, wait_until, write_deployment
from hsu_echo.v1 import echo_pb2, echo_pb2_grpc

pytestmark = pytest.mark.integration

ECHO = "hsu.echo.v1.Echo"
PUBLISHER = str(Path(__file__).with_name("hsu_publisher.py"))


def records(text: str) -> list[dict[str, Any]]:
    """Every line parsed: a line that is not JSON fails the test."""
    return [json.loads(line)["record"] for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("via", ["setting", "flag"])
def test_a_json_kernel_writes_every_record_with_its_unit_instance_pid_and_trace(
    tmp_path: Path, kernel_process, via: str
) -> None:
    setting = "kernel:\n  log_format: json\n" if via == "setting" else ""
    deployment = write_deployment(
        tmp_path / "logs.yaml",
        f"""{setting}
units:
  pub:
    command: [{sys.executable}, {PUBLISHER}]
    interfaces: [{ECHO}]
""",
    )
    kernel = kernel_process(deployment, None, *(["--log-format", "json"] if via == "flag" else []))
    kernel.wait_ready()
    trace_id, parent_span = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(kernel.data) as channel:
        reply = echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message="orders.logged"),
            metadata=(("traceparent", f"00-{trace_id}-{parent_span}-01"),),
            timeout=30,
        )
    assert reply.message.startswith("seq ")

    def hsu_lines() -> list[dict[str, Any]]:
        return [r for r in records(kernel.output()[1]) if r["extra"].get("stream") == "stderr"]

    wait_until(lambda: any("publishing" in r["message"] for r in hsu_lines()), 30)
    code, _out, err = kernel.stop()
    assert code == 0
    every = records(err)
    assert every, "the kernel wrote nothing"
    for r in every:
        extra = r["extra"]
        assert {"unit", "instance", "pid"} <= set(extra), r
        assert isinstance(extra["pid"], int) and extra["pid"] > 0
    kernel_pid = kernel.proc.pid
    running = [r for r in every if "kernel created -> starting" in r["message"]]
    assert running and running[0]["extra"]["pid"] == kernel_pid
    assert running[0]["extra"]["unit"] == "" and running[0]["process"]["id"] == kernel_pid
    registered = next(r for r in every if r["message"].startswith("registered at"))
    instance = registered["extra"]["instance"]
    assert registered["extra"]["unit"] == "pub" and instance.startswith("pub-")
    # the HSU's own lines: captured by the kernel with their stream, instance
    # and pid, each one itself a JSON record of the SDK's
    lines = hsu_lines()
    assert all(r["extra"]["instance"] == instance and r["extra"]["unit"] == "pub" for r in lines)
    assert all(r["extra"]["pid"] != kernel_pid for r in lines)
    inner = [json.loads(r["message"])["record"] for r in lines]
    [call] = [r for r in inner if "publishing" in r["message"]]
    assert call["extra"]["unit"] == "pub" and call["extra"]["instance"] == instance
    assert call["extra"]["pid"] == lines[0]["extra"]["pid"]
    # inside the call: the caller's trace, under a span of the HSU's own
    assert call["extra"]["trace_id"] == trace_id
    assert len(call["extra"]["span_id"]) == 16 and call["extra"]["span_id"] != parent_span
    outside = [r for r in inner if "registered with kernel" in r["message"]]
    assert outside and "trace_id" not in outside[0]["extra"]


def test_log_format_flag_and_a_bad_setting(tmp_path: Path) -> None:
    deployment = write_deployment(
        tmp_path / "bad.yaml",
        "kernel:\n  log_format: xml\nunits: {}\n",
    )
    bad = run_hsu("config", "validate", str(deployment))
    assert bad.returncode != 0
    assert "kernel.log_format" in bad.stderr and "xml" in bad.stderr
    refused = subprocess.run(
        [*HSU, "--log-format", "yaml", "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=hsu_env(),
        timeout=60,
    )
    assert refused.returncode == 2 and "--log-format" in refused.stderr


def test_a_sink_added_after_the_first_does_not_read_sysconfig_again(monkeypatch) -> None:
    """Each ``logger.add`` makes an exception formatter that lists the library
    directories; with :mod:`hsu._kernel.logsetup` loaded, loguru reads them from
    :mod:`sysconfig` once a process (``hsu run`` adds four sinks as it
    starts), and tracebacks are formatted as before."""
    import io
    import sysconfig

    from loguru import logger

    import hsu._kernel.logsetup  # noqa: F401

    calls = []
    real = sysconfig.get_scheme_names
    monkeypatch.setattr(sysconfig, "get_scheme_names", lambda: calls.append(1) or real())
    out = io.StringIO()
    sinks = [logger.add(out, backtrace=True, diagnose=False) for _ in range(3)]
    try:
        assert len(calls) <= 1
        try:
            json.loads("{")
        except ValueError:
            logger.exception("boom")
    finally:
        for sink in sinks:
            logger.remove(sink)
    text = out.getvalue()
    assert text.count("boom") == 3 and text.count("JSONDecodeError") >= 3
