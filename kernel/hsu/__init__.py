"""hsu: compose an application out of supervised gRPC worker processes.

The public API for deployments, plugin authors and HSU authors. Plugins write
``@hsu.hookimpl``; HSU authors use :mod:`hsu.worker`.

Names that need the kernel (``Kernel``, ``connect``, ``load_deployment``, ...)
are imported on first use: an HSU that imports :mod:`hsu.worker`, or a CLI
call, does not pay for the supervisor, the config schema and psutil.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hsu._version import __version__
from hsu.errors import (
    ConfigError,
    ConflictError,
    HsuError,
    InvalidTransition,
    LaunchError,
    NoSuchUnit,
    PluginError,
    PluginLoadError,
)
from hsu.hookspecs import hookimpl

if TYPE_CHECKING:
    from hsu.client import RoutedChannel, connect
    from hsu.client_sync import SyncRoutedChannel, connect_sync
    from hsu.config import (
        Deployment,
        KernelSettings,
        UnitSpec,
        deployment_from_dict,
        load_deployment,
    )
    from hsu.instances import Instance, InstanceState
    from hsu.lifecycle import KernelState, StateMachine, Transition
    from hsu.microkernel import Kernel
    from hsu.plugin_manager import PluginInfo, PluginManager
    from hsu.ports import Launcher, LaunchSpec, ProcessHandle

#: name -> the module it is imported from on first use
_LAZY = {
    "RoutedChannel": "hsu.client",
    "connect": "hsu.client",
    "SyncRoutedChannel": "hsu.client_sync",
    "connect_sync": "hsu.client_sync",
    "Deployment": "hsu.config",
    "KernelSettings": "hsu.config",
    "UnitSpec": "hsu.config",
    "deployment_from_dict": "hsu.config",
    "load_deployment": "hsu.config",
    "Instance": "hsu.instances",
    "InstanceState": "hsu.instances",
    "KernelState": "hsu.lifecycle",
    "StateMachine": "hsu.lifecycle",
    "Transition": "hsu.lifecycle",
    "Kernel": "hsu.microkernel",
    "PluginInfo": "hsu.plugin_manager",
    "PluginManager": "hsu.plugin_manager",
    "Launcher": "hsu.ports",
    "LaunchSpec": "hsu.ports",
    "ProcessHandle": "hsu.ports",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hsu' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ConfigError",
    "ConflictError",
    "Deployment",
    "HsuError",
    "Instance",
    "InstanceState",
    "InvalidTransition",
    "Kernel",
    "KernelSettings",
    "KernelState",
    "LaunchError",
    "LaunchSpec",
    "Launcher",
    "NoSuchUnit",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PluginManager",
    "ProcessHandle",
    "RoutedChannel",
    "StateMachine",
    "SyncRoutedChannel",
    "Transition",
    "UnitSpec",
    "__version__",
    "connect",
    "connect_sync",
    "deployment_from_dict",
    "hookimpl",
    "load_deployment",
]
