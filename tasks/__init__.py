"""fairseq tasks of the plugin: ``moe_language_modeling`` and ``moe_translation``."""

from . import moe_language_modeling, moe_translation  # noqa: F401 (registration)
