"""One-line command-line errors for the plugin's checks inside the stock fairseq tools."""

import sys


def in_fairseq_tool() -> bool:
    """True when the running program is one of fairseq's command-line tools (``fairseq-*``
    console scripts or ``python -m fairseq_cli.<tool>``), where errors should be one line."""
    prog = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = prog.replace("\\", "/").rsplit("/", 1)[-1]
    return name.startswith("fairseq-") or "fairseq_cli/" in prog.replace("\\", "/")


def exit_with_error(problem: str) -> "None":
    """End the running tool with ``<tool>: error: <problem>`` (exit status 1, no traceback).

    Raises:
        SystemExit: always.
    """
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "fairseq"
    if prog.endswith(".py"):  # ``python -m fairseq_cli.train`` etc.
        prog = "fairseq-" + prog[:-3].replace("_", "-")
    raise SystemExit(f"{prog}: error: {problem}")
