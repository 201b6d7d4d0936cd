"""The kernel's cache layers (``kernel.caches``): opened as it starts, stacked
into one :class:`hsu.cache.Layers`, counted as metrics, closed as it stops."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from loguru import logger

from hsu.cache import CacheSettings, Layers
from hsu.errors import PluginError
from hsu.metrics import Family, Point

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel
    from hsu._kernel.plugins import PluginManager


def layer_names(configured: tuple[str, ...] | None, plugins: PluginManager) -> tuple[str, ...]:
    """The layers in order: ``kernel.caches``, else the default cache (if a
    plugin declares one); a name no plugin registered is an error naming it."""
    if configured is None:
        default = plugins.default("cache")
        return (default,) if default else ()
    registered = plugins.names("cache")
    missing = [n for n in configured if n not in registered]
    if missing:
        raise PluginError(
            f"kernel.caches: no cache named {', '.join(map(repr, missing))}"
            f" (registered: {', '.join(registered) or 'none'}); is its plugin enabled?"
        )
    if len(set(configured)) != len(configured):
        raise PluginError(f"kernel.caches: a layer named twice in {list(configured)}")
    return configured


def open_caches(kernel: Kernel) -> Layers | None:
    """The layers, each made by its plugin's factory; a factory that fails is
    logged and its layer left out (the kernel runs, with fewer layers)."""
    names = layer_names(kernel.kernel_settings.caches, kernel.plugins)
    if not names:
        return None
    layers = []
    for name in names:
        try:
            layers.append((name, kernel.plugins.cache(name)(kernel)))
        except Exception as exc:
            logger.error("kernel.caches: {}: {}; running without that layer", name, exc)
    settings: CacheSettings = kernel.settings("cache")
    stack = Layers(layers, fill_ttl=settings.fill_ttl, retry_after=settings.retry_after)
    logger.info("cache layers: {}", stack.describe)
    kernel.metrics.add_collector("cache", lambda: _families(stack))
    return stack


def _families(stack: Layers) -> Iterable[Family]:
    stats = stack.layer_stats()
    counters = (
        ("hsu_cache_hits_total", "Values found in a cache layer", "hits"),
        ("hsu_cache_misses_total", "Values not found in a cache layer", "misses"),
        ("hsu_cache_evictions_total", "Values a cache layer dropped to make room", "evictions"),
        ("hsu_cache_errors_total", "Cache layer calls that failed (the layer skipped)", "errors"),
    )
    for name, help_, field in counters:
        yield Family(name, "counter", help_, tuple(
            Point((("layer", layer),), float(getattr(st, field))) for layer, st in stats
        ))  # fmt: skip
    yield Family(
        "hsu_cache_bytes",
        "gauge",
        "Bytes a cache layer holds (layers that know: memory)",
        tuple(Point((("layer", layer),), float(st.bytes)) for layer, st in stats if st.bytes >= 0),
    )
