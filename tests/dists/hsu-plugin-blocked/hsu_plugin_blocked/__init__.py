"""A plugin that must never run when blocked: it fails the kernel's start."""

import hsu


@hsu.hookimpl
def hsu_kernel_starting(kernel):
    raise RuntimeError("hsu-plugin-blocked ran although it was blocked")
