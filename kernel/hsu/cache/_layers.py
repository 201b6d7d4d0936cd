"""Caches stacked in order: :class:`Layers`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from loguru import logger

from hsu.ports import Cache, Cached, CacheStats


class Layers:
    """Several :class:`hsu.ports.Cache` as one, first to last (``memory``,
    then ``redis``).

    A get asks each layer in turn and stops at the first hit; the layers
    above it that missed are filled with the value (for its remaining TTL, or
    ``fill_ttl`` when it has none). A set and a delete go to every layer.

    A layer that raises is skipped: the call goes on with the next layer (a
    get) or the rest (a set), the failure is logged (a warning the first
    time, then at debug level until the layer works again) and counted
    (:meth:`layer_stats`), and the layer is left out for ``retry_after``
    seconds, so a server that is down costs one timeout a second, not one
    per call. No method of this class raises because a layer failed.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, Cache]],
        *,
        fill_ttl: float = 60.0,
        retry_after: float = 1.0,
    ) -> None:
        self.layers = list(layers)
        self.fill_ttl = fill_ttl
        self.retry_after = retry_after
        n = len(self.layers)
        self._errors = [0] * n
        #: monotonic time before which a failed layer is skipped
        self._down_until = [0.0] * n
        self._failing = [False] * n
        self.hits = 0
        self.misses = 0

    @property
    def describe(self) -> str:
        return " -> ".join(f"{name}: {layer.describe}" for name, layer in self.layers) or "none"

    def _up(self, i: int) -> bool:
        return not self._down_until[i] or time.monotonic() >= self._down_until[i]

    def _failed(self, i: int, what: str, exc: BaseException) -> None:
        name, layer = self.layers[i]
        self._errors[i] += 1
        self._down_until[i] = time.monotonic() + self.retry_after
        log = logger.debug if self._failing[i] else logger.warning
        self._failing[i] = True
        log(
            "cache layer {} ({}): {} failed: {!r}; skipped for {}s",
            name, layer.describe, what, exc, self.retry_after,
        )  # fmt: skip

    def _worked(self, i: int) -> None:
        if self._failing[i]:
            self._failing[i] = False
            self._down_until[i] = 0.0
            name, layer = self.layers[i]
            logger.info("cache layer {} ({}) works again", name, layer.describe)

    async def get(self, key: str) -> Cached | None:
        missed: list[int] = []
        for i, (_, layer) in enumerate(self.layers):
            if not self._up(i):
                continue
            try:
                hit = await layer.get(key)
            except Exception as exc:
                self._failed(i, "get", exc)
                continue
            self._worked(i)
            if hit is None:
                missed.append(i)
                continue
            self.hits += 1
            ttl = hit.ttl if hit.ttl is not None else self.fill_ttl
            for j in missed:
                try:
                    await self.layers[j][1].set(key, hit.value, ttl=ttl)
                except Exception as exc:
                    self._failed(j, "fill", exc)
            return hit
        self.misses += 1
        return None

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        for i, (_, layer) in enumerate(self.layers):
            if not self._up(i):
                continue
            try:
                await layer.set(key, value, ttl=ttl)
            except Exception as exc:
                self._failed(i, "set", exc)
            else:
                self._worked(i)

    async def delete(self, key: str) -> bool:
        """Delete from every layer; a layer that is down keeps its copy
        until its TTL, which is why a cached value always has one in a
        shared layer (docs/cache.md)."""
        found = False
        for i, (_, layer) in enumerate(self.layers):
            try:
                found = await layer.delete(key) or found
            except Exception as exc:
                self._failed(i, "delete", exc)
        return found

    def stats(self) -> CacheStats:
        """The stack's own hits and misses (a hit in any layer is one hit),
        the layers' evictions and errors summed."""
        evictions = errors = 0
        for _, st in self.layer_stats():
            evictions += st.evictions
            errors += st.errors
        return CacheStats(self.hits, self.misses, evictions, errors)

    def layer_stats(self) -> list[tuple[str, CacheStats]]:
        """Each layer's own counts, with the failures this stack saw as ``errors``."""
        out = []
        for i, (name, layer) in enumerate(self.layers):
            try:
                st = layer.stats()
            except Exception:
                st = CacheStats()
            errors = st.errors + self._errors[i]
            out.append(
                (name, CacheStats(st.hits, st.misses, st.evictions, errors, st.entries, st.bytes))
            )
        return out

    async def close(self) -> None:
        for name, layer in self.layers:
            try:
                await layer.close()
            except Exception as exc:
                logger.warning("closing cache layer {}: {!r}", name, exc)
