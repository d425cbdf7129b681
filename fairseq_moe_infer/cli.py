"""One-line command-line errors for the plugin's checks inside the stock fairseq tools."""

import sys


def exit_with_error(problem: str) -> "None":
    """End the running tool with ``<tool>: error: <problem>`` (exit status 1, no traceback).

    Raises:
        SystemExit: always.
    """
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "fairseq"
    if prog.endswith(".py"):  # ``python -m fairseq_cli.train`` etc.
        prog = "fairseq-" + prog[:-3].replace("_", "-")
    raise SystemExit(f"{prog}: error: {problem}")
