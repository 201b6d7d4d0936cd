"""hsu: compose an application out of supervised gRPC worker processes.

The public API for deployments, plugin authors and HSU authors. Plugins write
``@hsu.hookimpl``; HSU authors use :mod:`hsu.worker`.

Names that need the kernel (``Kernel``, ``connect``, ``load_deployment``, ...)
are imported on first use: an HSU that imports :mod:`hsu.worker`, or a CLI
call, does not pay for the supervisor, the config schema and psutil. So is
``hookimpl`` (pluggy and :mod:`hsu.hookspecs`): ``@hsu.hookimpl`` and
``from hsu import hookimpl`` load them, ``hsu ping`` does not.
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

if TYPE_CHECKING:
    from hsu._kernel.config.model import (
        Deployment,
        KernelSettings,
        UnitSpec,
        deployment_from_dict,
        load_deployment,
    )
    from hsu._kernel.kernel import Kernel
    from hsu._kernel.lifecycle import KernelState, StateMachine, Transition
    from hsu._kernel.plugins import PluginInfo, PluginManager
    from hsu._kernel.supervision.instances import Instance, InstanceState
    from hsu.client.aio import RoutedChannel, connect
    from hsu.client.lease import AsyncLease, SyncLease, lease, lease_sync
    from hsu.client.sync import SyncRoutedChannel, connect_sync
    from hsu.hookspecs import hookimpl
    from hsu.ports import Launcher, LaunchSpec, ProcessHandle

#: name -> the module it is imported from on first use
_LAZY = {
    "hookimpl": "hsu.hookspecs",
    "RoutedChannel": "hsu.client.aio",
    "connect": "hsu.client.aio",
    "SyncRoutedChannel": "hsu.client.sync",
    "connect_sync": "hsu.client.sync",
    "AsyncLease": "hsu.client.lease",
    "SyncLease": "hsu.client.lease",
    "lease": "hsu.client.lease",
    "lease_sync": "hsu.client.lease",
    "Deployment": "hsu._kernel.config.model",
    "KernelSettings": "hsu._kernel.config.model",
    "UnitSpec": "hsu._kernel.config.model",
    "deployment_from_dict": "hsu._kernel.config.model",
    "load_deployment": "hsu._kernel.config.model",
    "Instance": "hsu._kernel.supervision.instances",
    "InstanceState": "hsu._kernel.supervision.instances",
    "KernelState": "hsu._kernel.lifecycle",
    "StateMachine": "hsu._kernel.lifecycle",
    "Transition": "hsu._kernel.lifecycle",
    "Kernel": "hsu._kernel.kernel",
    "PluginInfo": "hsu._kernel.plugins",
    "PluginManager": "hsu._kernel.plugins",
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
    "AsyncLease",
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
    "SyncLease",
    "SyncRoutedChannel",
    "Transition",
    "UnitSpec",
    "__version__",
    "connect",
    "connect_sync",
    "deployment_from_dict",
    "hookimpl",
    "lease",
    "lease_sync",
    "load_deployment",
]
