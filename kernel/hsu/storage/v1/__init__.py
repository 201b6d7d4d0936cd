"""Generated from proto/hsu/storage/v1 by `nox -s proto`."""
