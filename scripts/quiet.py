"""Keep fairseq's import-time log lines out of the plugin's own scripts (shown with ``--verbose``).

Importing fairseq logs ``Please install tensorboardX`` at INFO, and its
``fairseq/models/wav2vec/wav2vec2_classification.py`` calls ``logging.basicConfig(level=DEBUG)``
on import, after which every library's DEBUG lines (Hydra's, matplotlib's) reach the terminal.
``logging.basicConfig`` only acts while the root logger has no handler, so configuring it first,
before fairseq is imported, keeps both out.
"""

import logging


def configure_logging(verbose: bool = False) -> None:
    """Configure the root logger: WARNING and above, or INFO and above if ``verbose``.

    Call before anything imports fairseq (``fairseq_moe_infer`` does).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
