"""Built-in cache layers (``hsu_register_caches``)."""
