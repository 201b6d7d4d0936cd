"""The kernel keeps its instance records in the storage port (sqlite by
default): re-attach after a SIGKILL, a corrupt file named and re-attach
skipped, a full disk logged with the previous record intact."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator

import psutil
from loguru import logger

from conftest import run_hsu, write_deployment
from hsu._kernel.supervision.records import NAMESPACE
from hsu.errors import StorageError
from hsu.testing import build_kernel
from hsu_plugins.storage.sqlite import SqliteStorage

SLEEPERS = """\
name: rec
units:
  sleeper:
    command: [python, -c, "import time; time.sleep(600)"]
    kind: managed
    start: at-start
    min_instances: 2
    max_instances: 2
    stop_grace: 2
"""


@contextlib.contextmanager
def logged(level: str = "WARNING") -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level=level)
    try:
        yield seen
    finally:
        logger.remove(sink)


def sleeper_pids(address: str) -> set[int]:
    out = run_hsu("status", "--json", "--address", address)
    assert out.returncode == 0, out.stderr
    return {i["pid"] for i in json.loads(out.stdout)["instances"]}


def test_a_sigkilled_kernel_re_attaches_from_the_sqlite_storage(kernel_process, tmp_path):
    path = write_deployment(tmp_path / "d.yaml", SLEEPERS)
    k = kernel_process(path)
    k.wait_ready()
    before = sleeper_pids(k.address)
    assert len(before) == 2
    state = tmp_path / ".hsu" / "rec"
    # the records are in the storage, not in a state file
    assert not (state / "state.json").exists()
    assert (state / "storage.sqlite3").exists()
    k.proc.kill()
    k.proc.wait()
    assert all(psutil.pid_exists(p) for p in before)
    again = kernel_process(path)
    again.wait_ready()
    assert sleeper_pids(again.address) == before  # the same processes: re-attached
    code, _, err = again.stop()
    assert code == 0, err
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in before)  # fmt: skip


async def test_a_corrupt_storage_file_is_named_and_re_attach_is_skipped(tmp_path):
    raw = {"name": "bad", "units": {}}
    kernel = build_kernel(raw, base_dir=str(tmp_path))
    file = kernel.state_dir / "storage.sqlite3"
    kernel.state_dir.mkdir(parents=True, mode=0o700)
    file.write_bytes(b"SQLite format 3\x00" + b"\xde\xad" * 4000)  # a header, then garbage
    file.chmod(0o600)
    before = file.read_bytes()
    with logged("ERROR") as errors:
        await kernel.start()
        try:
            assert kernel.state == "running"
        finally:
            await kernel.stop()
    assert any(
        m.startswith(f"cannot read the kernel's instance records: {file}:")
        and m.endswith("re-attach skipped")
        for m in errors
    ), errors
    assert file.read_bytes() == before  # left for the operator, not rewritten


async def test_a_full_disk_is_logged_and_the_previous_record_stays(tmp_path):
    raw = {
        "name": "full",
        "units": {
            "s": {"command": ["sleep", "60"], "kind": "managed", "start": "at-start",
                  "stop_grace": 2, "max_instances": 2},
        },
        "sqlite": {"max_bytes": 65536},
    }  # fmt: skip
    kernel = build_kernel(raw, base_dir=str(tmp_path))
    await kernel.start()
    try:
        storage = kernel.storage
        assert isinstance(storage, SqliteStorage)
        [key] = [kv.key for kv in (await storage.list(NAMESPACE))[0]]
        recorded = await storage.get(NAMESPACE, key)
        assert recorded is not None
        assert len(json.loads(recorded.value)["instances"]) == 1
        # fill the file up to its cap: what the kernel writes next cannot fit
        filled = 0
        for size in (8000, 1000, 100, 10):
            with contextlib.suppress(StorageError):
                for _ in range(200):
                    await storage.put("filler", f"f{filled}", os.urandom(size))
                    filled += 1
        assert 0 < filled < 800
        with logged("ERROR") as errors:
            await kernel.scale("s", 2)
            await kernel.records.flush()
        assert any(
            m.startswith("cannot record the kernel's instances: ")
            and "the disk is full" in m
            and str(storage.path) in m
            for m in errors
        ), errors
        assert kernel.state == "running"
        assert await storage.get(NAMESPACE, key) == recorded  # the previous record, intact
    finally:
        await kernel.stop()


def test_another_user_cannot_read_the_storage(tmp_path, kernel_process):
    path = write_deployment(tmp_path / "d.yaml", SLEEPERS)
    k = kernel_process(path)
    k.wait_ready()
    file = tmp_path / ".hsu" / "rec" / "storage.sqlite3"
    tmp_path.chmod(0o755)  # even where the deployment's dir is open to others
    try:
        read = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             "cat", str(file)],
            capture_output=True, text=True,
        )  # fmt: skip
    finally:
        tmp_path.chmod(0o700)
    assert read.returncode != 0 and "Permission denied" in read.stderr
