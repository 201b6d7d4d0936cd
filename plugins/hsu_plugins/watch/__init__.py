"""Watchers of units' instances (``hsu_register_watchers``): ``idle`` stops
instances no call used for ``idle_timeout``, ``limits`` acts on a unit's
resource thresholds. Each is a plugin of its own, blockable with ``no:NAME``."""
