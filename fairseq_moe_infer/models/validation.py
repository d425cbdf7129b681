"""Turn configuration errors into one clear command-line error line."""

import contextlib
import sys

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
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "fairseq"
        raise SystemExit(f"{prog}: error: {e}") from None
