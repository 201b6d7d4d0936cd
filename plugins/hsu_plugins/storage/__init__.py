"""Built-in storages (:class:`hsu.ports.Storage`): ``sqlite``, the default."""
