"""A well-behaved third-party plugin: settings, and lifecycle hooks that leave a trace."""

from pathlib import Path

import attrs

import hsu


@attrs.frozen
class Settings:
    marker_file: str = ""


@hsu.hookimpl
def hsu_register_settings(register):
    register("good", Settings)


@hsu.hookimpl
def hsu_kernel_started(kernel):
    marker = kernel.settings("good").marker_file
    if marker:
        with Path(marker).open("a") as f:
            f.write(f"started {kernel.address}\n")


@hsu.hookimpl
def hsu_kernel_stopped(kernel):
    marker = kernel.settings("good").marker_file
    if marker:
        with Path(marker).open("a") as f:
            f.write("stopped\n")
