"""The kernel's control API (``hsu.kernel.v1.Kernel``)."""
