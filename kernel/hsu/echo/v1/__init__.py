"""Generated from proto/hsu/echo/v1 by `nox -s proto`."""
