"""The reference Echo interface (``hsu.echo.v1.Echo``)."""
