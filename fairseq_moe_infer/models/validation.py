"""Turn configuration errors into one clear command-line error line."""

import contextlib

from ..cli import exit_with_error
from ..moe import MoEConfigError


@contextlib.contextmanager
def cli_errors():
    """Re-raise :class:`MoEConfigError` as ``SystemExit`` with a one-line message.

    fairseq's command-line tools would otherwise print a traceback for a bad
    ``--moe-*`` value; library callers outside this context still get the
    exception.
    """
    try:
        yield
    except MoEConfigError as e:
        exit_with_error(str(e))
