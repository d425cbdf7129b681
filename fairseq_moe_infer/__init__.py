"""fairseq_moe_infer: fast and lean Mixture-of-Experts inference as a fairseq plugin.

Load it into the stock fairseq tools with ``--user-dir $(python -m fairseq_moe_infer)``.
Importing registers the ``transformer_lm_moe`` / ``transformer_moe`` models, the
``moe_cross_entropy`` / ``moe_label_smoothed_cross_entropy`` criterions and the
``moe_language_modeling`` / ``moe_translation`` tasks, and lets torch >= 2.6
load fairseq checkpoints (see :mod:`fairseq_moe_infer.checkpoint`).
"""

import contextlib
import logging
import os

__version__ = "0.1.0"

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# In a source checkout the fairseq registrations live in criterions/ and tasks/ beside
# this package; an installed copy has them inside it (setup.py maps them there).
if not os.path.isdir(os.path.join(_HERE, "tasks")) and os.path.isfile(os.path.join(_ROOT, "tasks", "__init__.py")):
    __path__.append(_ROOT)  # noqa: F821 (package __path__)



@contextlib.contextmanager
def _root_logger_left_alone():
    """Keep fairseq's import-time ``logging.basicConfig`` calls from configuring the root logger.

    Importing fairseq runs ``logging.basicConfig(level=INFO)`` (fairseq/tasks/text_to_speech.py,
    which then logs "Please install tensorboardX") and ``logging.basicConfig(level=DEBUG)``
    (fairseq/models/wav2vec/wav2vec2_classification.py, after which every library's DEBUG lines
    print). Where the plugin is what imports fairseq first (``python -m fairseq_moe_infer``, a
    script of one's own), a ``NullHandler`` on the root logger during the import makes both calls
    no-ops; it is removed after, so logging stays the caller's to configure. The fairseq tools
    configure logging before they import the plugin: there the root logger has a handler and this
    does nothing.
    """
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard:
            root.removeHandler(guard)


with _root_logger_left_alone():
    from . import checkpoint  # noqa: E402

    checkpoint.allow_fairseq_checkpoint_globals()

    from . import fairseq_patches  # noqa: E402

    fairseq_patches.install_all()  # every wrapped fairseq function is listed there, with why

    from . import expert_parallel_generate  # noqa: E402

    expert_parallel_generate.install_generate_hooks()

    from . import criterions, models, tasks  # noqa: E402,F401 (fairseq registrations)


def user_dir() -> str:
    """The directory to pass to fairseq's ``--user-dir``."""
    return _HERE
