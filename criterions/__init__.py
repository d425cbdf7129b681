"""fairseq criterions of the plugin: ``moe_cross_entropy`` and ``moe_label_smoothed_cross_entropy``."""

from . import moe_cross_entropy, moe_label_smoothed_cross_entropy  # noqa: F401 (registration)
