"""Generated from proto/hsu/cache/v1 by `nox -s proto`."""
