"""Generated from proto/hsu/core/v1 by `nox -s proto`."""
