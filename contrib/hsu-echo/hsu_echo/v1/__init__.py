"""Generated from proto/hsu_echo/v1 by `nox -s proto`; the wire name stays `hsu.echo.v1.Echo`."""
