"""hsu-plugin-etcd: kernels on several hosts share one etcd cluster.

Provides the ``etcd`` registry (``kernel.registry: etcd``), the ``etcd``
storage (``kernel.storage: etcd``), leadership for ``placement: singleton``
units, and the ``etcd`` settings section. See README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu
from hsu.errors import ConfigError
from hsu.ports import ConfigSource, KernelAPI, Register, Registry, Storage, StorageSettings
from hsu_plugin_etcd.settings import EtcdSettings

SECTION = "etcd"

__all__ = ["SECTION", "EtcdSettings", "create_registry", "create_storage"]


def create_registry(kernel: KernelAPI) -> Registry:
    """The registry factory: ``factory(kernel)``, from the ``etcd`` section."""
    from hsu_plugin_etcd.registry import EtcdRegistry

    settings: EtcdSettings = kernel.settings(SECTION)
    return EtcdRegistry(settings, settings.node_name(), kernel, startable(kernel))


def startable(kernel: KernelAPI) -> list[str]:
    """The units this kernel can start for another kernel's call (placement)."""
    return [
        name
        for name, u in kernel.deployment.units.items()
        if u.placement != "singleton" and u.interfaces
    ]


@hsu.hookimpl
async def hsu_config_reloaded(kernel: KernelAPI, old: Any, changes: Any) -> None:
    """The kernel announces the units it can start now (a unit added or removed)."""
    from hsu_plugin_etcd.registry import EtcdRegistry

    registry = kernel.registry
    if not isinstance(registry, EtcdRegistry) or registry.cluster is None:
        return
    units = tuple(startable(kernel))
    if units != registry.cluster.units:
        registry.cluster.units = units
        await registry.announce()


def create_storage(kernel: KernelAPI) -> Storage:
    """The storage factory: keys under ``etcd.prefix``/kv/ (docs/storage.md, "etcd")."""
    from hsu_plugin_etcd.storage import EtcdStorage

    settings: EtcdSettings = kernel.settings(SECTION)
    common: StorageSettings = kernel.settings("storage")
    return EtcdStorage(settings, max_value_bytes=common.max_value_bytes)


@hsu.hookimpl
def hsu_register_storages(register: Register[Callable[[KernelAPI], Storage]]) -> None:
    register("etcd", create_storage)


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, EtcdSettings)


@hsu.hookimpl
def hsu_register_config_sources(register: Callable[[str, ConfigSource], None]) -> None:
    from hsu_plugin_etcd.config_source import EtcdConfigSource

    register("etcd", EtcdConfigSource())


@hsu.hookimpl
def hsu_register_registries(register: Register[Callable[..., Registry]]) -> None:
    register("etcd", create_registry)


@hsu.hookimpl
def hsu_kernel_configure(kernel: KernelAPI) -> None:
    """Campaign for the deployment's singleton units, if it has any."""
    singletons = [n for n, u in kernel.deployment.units.items() if u.placement == "singleton"]
    if not singletons:
        return  # and aetcd stays unimported
    from hsu_plugin_etcd.leader import NAME, Leadership

    settings: EtcdSettings = kernel.settings(SECTION)
    problems = []
    for name in singletons:
        unit = kernel.deployment.units[name]
        stop = unit.stop_grace + unit.routing.drain_timeout
        if stop > settings.retry_timeout:
            problems.append(
                f"units.{name}: stop_grace ({unit.stop_grace:g}) + routing.drain_timeout"
                f" ({unit.routing.drain_timeout:g}) = {stop:g} s is more than etcd.retry_timeout"
                f" ({settings.retry_timeout:g}): a leader that loses etcd must stop its"
                " singleton within retry_timeout, before its lease expires"
            )
    if problems:
        raise ConfigError(problems, kernel.deployment.source)
    kernel.register_plugin(Leadership(kernel, settings, singletons), NAME)
