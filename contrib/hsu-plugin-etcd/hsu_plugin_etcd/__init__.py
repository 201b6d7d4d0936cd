"""hsu-plugin-etcd: kernels on several hosts share one etcd cluster.

Provides the ``etcd`` registry (``kernel.registry: etcd``) and the ``etcd``
settings section. See README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hsu
from hsu.ports import KernelAPI, Register, Registry
from hsu_plugin_etcd.settings import EtcdSettings

SECTION = "etcd"

__all__ = ["SECTION", "EtcdSettings", "create_registry"]


def create_registry(kernel: KernelAPI) -> Registry:
    """The registry factory: ``factory(kernel)``, from the ``etcd`` section."""
    from hsu_plugin_etcd.registry import EtcdRegistry

    settings: EtcdSettings = kernel.settings(SECTION)
    return EtcdRegistry(settings, settings.node_name())


@hsu.hookimpl
def hsu_register_settings(register: Callable[[str, type[Any]], None]) -> None:
    register(SECTION, EtcdSettings)


@hsu.hookimpl
def hsu_register_registries(register: Register[Callable[..., Registry]]) -> None:
    register("etcd", create_registry)
