"""hsu: compose an application out of supervised gRPC worker processes.

The public API for deployments, plugin authors and HSU authors. Plugins write
``@hsu.hookimpl``; HSU authors use :mod:`hsu.worker`.
"""

from hsu._version import __version__
from hsu.client import RoutedChannel, connect
from hsu.client_sync import SyncRoutedChannel, connect_sync
from hsu.config import Deployment, KernelSettings, UnitSpec, deployment_from_dict, load_deployment
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
from hsu.instances import Instance, InstanceState
from hsu.lifecycle import KernelState, StateMachine, Transition
from hsu.microkernel import Kernel
from hsu.plugin_manager import PluginInfo, PluginManager
from hsu.ports import Launcher, LaunchSpec, ProcessHandle

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
