"""One-line command-line errors for the plugin's checks inside the stock fairseq tools."""

import os
import sys


def in_fairseq_tool() -> bool:
    """True when the running program is one of fairseq's command-line tools (a ``fairseq-*``
    console script, ``python -m fairseq_cli.<tool>`` or ``fairseq_cli/<tool>.py``), where
    errors should be one line."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", "").startswith("fairseq_cli."):
        return True
    prog = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    folder, name = os.path.split(prog)
    return (name.startswith("fairseq-") and not name.endswith(".py")) or os.path.basename(folder) == "fairseq_cli"


_failed = []  # problems passed to exit_with_error in this process


def run_failed() -> bool:
    """True when this process is ending because of an error or an interruption: an uncaught
    exception such as ``KeyboardInterrupt`` (SIGINT; Python sets ``sys.last_type`` before the
    ``atexit`` handlers run) or :func:`exit_with_error`."""
    return getattr(sys, "last_type", None) is not None or bool(_failed)


def failed_with_error_line() -> bool:
    """True when :func:`exit_with_error` ended this process (its line is already printed)."""
    return bool(_failed)


def exit_with_error(problem: str) -> "None":
    """End the running tool with ``<tool>: error: <problem>`` (exit status 1, no traceback).

    Raises:
        SystemExit: always.
    """
    _failed.append(problem)
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "fairseq"
    if prog.endswith(".py"):  # ``python -m fairseq_cli.train`` etc.
        prog = "fairseq-" + prog[:-3].replace("_", "-")
    raise SystemExit(f"{prog}: error: {problem}")


def loaded_tool_modules(name: str) -> list:
    """The loaded copies of ``fairseq_cli.<name>``: the module itself and a run of it as ``__main__``
    (``python -m fairseq_cli.<name>``) or ``__mp_main__`` (the workers fairseq's launcher spawns
    re-run the script under that name). Nothing is imported: importing a fairseq_cli module
    (e.g. ``interactive``) configures logging for the whole process."""
    mods = [sys.modules[f"fairseq_cli.{name}"]] if f"fairseq_cli.{name}" in sys.modules else []
    for key in ("__main__", "__mp_main__"):
        main = sys.modules.get(key)
        if main is not None and (getattr(main, "__file__", "") or "").endswith(os.path.join("fairseq_cli", f"{name}.py")):
            mods.append(main)
    return mods
