"""Built-in metrics exporters (``hsu_register_exporters``)."""
