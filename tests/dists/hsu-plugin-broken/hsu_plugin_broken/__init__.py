"""A plugin whose import fails, as one with a missing dependency would."""

import hsu_plugin_broken_missing_dependency  # noqa: F401
