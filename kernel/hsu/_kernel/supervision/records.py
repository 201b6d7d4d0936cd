"""The kernel's instance records, kept in the storage port (docs/storage.md).

What a kernel that was SIGKILLed needs to re-attach to the HSUs it left
running (:class:`statefile.SavedState`: its own pid, and each instance's pid,
start time, address and token) is one JSON value under one key of the
storage's ``hsu.kernel`` namespace. With the default ``sqlite`` storage that
is a 0600 file in the 0700 state dir, fsynced before a write is reported
done; a storage shared by kernels (redis, etcd) keeps one key per host and
state dir.

Writes are coalesced: however many instances change in one loop turn, one
put follows, and a put is never overtaken by an older one. A storage that
fails is logged (once per distinct error) and the kernel goes on: it runs,
it only could not record. A record that cannot be read (a corrupt file)
skips re-attach with an error naming the storage; nothing is guessed.

A ``state.json`` left by a kernel of an earlier version is read once, with
every check it always had (:mod:`statefile`), and removed once its content is
in the storage.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

from loguru import logger

from hsu._kernel.supervision import statefile
from hsu.errors import HsuError, StorageError
from hsu.ports import Storage

NAMESPACE = "hsu.kernel"


class InstanceRecords:
    def __init__(self, storage: Storage | None, state_dir: Path, legacy: Path | None) -> None:
        self.storage = storage
        self.key = f"reattach/{socket.gethostname()}{state_dir}"
        self.legacy = legacy
        self._pending: statefile.SavedState | None = None
        self._writer: asyncio.Task[None] | None = None
        self._last_error = ""
        self._migrated = False

    @property
    def where(self) -> str:
        return self.storage.describe if self.storage is not None else "(no storage)"

    async def load(self) -> statefile.SavedState | None:
        """The state a kernel left, or None (none, not trusted, or unreadable:
        then re-attach is skipped and the error names the storage)."""
        if self.legacy is not None and os.path.lexists(self.legacy):  # noqa: ASYNC240
            saved = statefile.load(self.legacy)  # raises for a malformed file, as always
            self._migrated = saved is not None
            if saved is not None or self.storage is None:
                return saved
        if self.storage is None:
            return None
        try:
            kv = await self.storage.get(NAMESPACE, self.key)
        except StorageError as exc:
            logger.error("cannot read the kernel's instance records: {}; re-attach skipped", exc)
            return None
        if kv is None:
            return None
        try:
            return statefile._conv.structure(json.loads(kv.value), statefile.SavedState)
        except Exception as exc:
            logger.error(
                "{}: the kernel's instance records ({}/{}) are not a format this version"
                " reads: {}; re-attach skipped",
                self.storage.describe,
                NAMESPACE,
                self.key,
                exc,
            )
            return None

    def save(self, state: statefile.SavedState) -> None:
        """Record ``state`` soon (the latest one wins; writes never overlap)."""
        if self.storage is None:
            return
        self._pending = state
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        assert self.storage is not None
        while self._pending is not None:
            state, self._pending = self._pending, None
            data = json.dumps(statefile._conv.unstructure(state)).encode()
            try:
                await self.storage.put(NAMESPACE, self.key, data)
            except HsuError as exc:
                if str(exc) != self._last_error:
                    self._last_error = str(exc)
                    logger.error("cannot record the kernel's instances: {}", exc)
                continue
            self._last_error = ""
            if self._migrated and self.legacy is not None:
                statefile.remove(self.legacy)
                self._migrated = False

    async def flush(self) -> None:
        """Wait until what was saved is written (or failed and was logged)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def forget(self) -> None:
        """The kernel stopped its instances: nothing is left to re-attach to."""
        self._pending = None
        await self.flush()
        if self.legacy is not None:
            statefile.remove(self.legacy)
        if self.storage is None:
            return
        try:
            await self.storage.delete(NAMESPACE, self.key)
        except HsuError as exc:
            logger.error("cannot clear the kernel's instance records: {}", exc)
