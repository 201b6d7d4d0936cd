"""hsu plugins for Redis (docs/cache.md): ``hsu_plugin_redis.cache``, a cache
layer kernels and HSUs share."""
