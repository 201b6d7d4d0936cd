"""Generated from proto/hsu/kernel/v1 by `nox -s proto`."""
