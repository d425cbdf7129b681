"""One-line command-line errors for the plugin's checks inside the stock fairseq tools."""

import logging
import os
import signal
import sys
import threading
import time


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


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask (for files
    written through ``tempfile.mkstemp``, which makes them private, then renamed into place)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_failed = []  # problems passed to exit_with_error in this process
_stopped_by = []  # the termination signal that ended this process (stop_on_sigterm)


def run_failed() -> bool:
    """True when this process is ending because of an error or an interruption: an uncaught
    exception such as ``KeyboardInterrupt`` (SIGINT; Python sets ``sys.last_type`` before the
    ``atexit`` handlers run), SIGTERM (:func:`stop_on_sigterm`) or :func:`exit_with_error`."""
    return getattr(sys, "last_type", None) is not None or bool(_failed) or bool(_stopped_by)


def stopped_by() -> str:
    """How this process is ending: ``SIGTERM`` (:func:`stop_on_sigterm`), ``lost rank``
    (:func:`mark_lost_rank`), ``SIGINT`` (an uncaught ``KeyboardInterrupt``), ``error``
    (:func:`exit_with_error`), ``exception`` (another uncaught exception), or ``""`` while it runs
    normally. Meant for ``atexit`` handlers."""
    if _stopped_by:
        return _stopped_by[0]
    last = getattr(sys, "last_type", None)
    if last is not None:
        return "SIGINT" if issubclass(last, KeyboardInterrupt) else "exception"
    return "error" if _failed else ""


def mark_lost_rank() -> None:
    """Record that this process is ending because another expert-parallel rank stopped taking part
    (:mod:`fairseq_moe_infer.bounded_waits`): the exit-time writers then mark what they write
    incomplete (``stopped_by`` ``lost rank``) and leave the tool's one error line last."""
    _stopped_by.append("lost rank")
    _failed.append("lost rank")


_sigterm_installed = []
_exiting = []


def mark_exiting() -> None:
    """Called by the exit-time writers (trace recorder, MoE summary): a SIGTERM from now on lets
    them finish (the process is ending anyway) instead of interrupting them."""
    _exiting.append(True)


SIGTERM_GRACE_S = 30.0  # after SIGTERM, seconds the process may take to end cleanly before it is ended at once


def stop_on_sigterm(grace_s: float = SIGTERM_GRACE_S) -> None:
    """Let SIGTERM (``timeout``, ``kill``, a batch scheduler) end this process like Ctrl-C does:
    the ``atexit`` handlers run, so the routing trace (``--moe-record-trace``) and the MoE summary
    are written, marked incomplete. Python's default for SIGTERM ends the process at once, without
    them.

    The handler raises ``SystemExit(143)`` (128 + SIGTERM, the shell's status for it) in the main
    thread, once; later SIGTERMs (``timeout`` signals the process, then its process group) are
    ignored while it ends. A Python handler runs only when the main thread executes Python code, so
    a process blocked in a long native call (a collective that never completes) would no longer end
    on SIGTERM: a watchdog thread, woken through ``signal.set_wakeup_fd``, ends it with status 143
    (``os._exit``, nothing written) when it has not ended ``grace_s`` seconds after the signal.
    Installed only in the main thread and only where SIGTERM still has Python's default action (a
    handler set by fairseq, torch or the user is kept); a process forked from this one (a data-loader
    worker) gets the default action back. Idempotent.
    """
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (the at-fork reset below came too late): the default action
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if _stopped_by or _exiting:
            return
        _stopped_by.append("SIGTERM")
        logging.getLogger("fairseq_moe_infer").warning(
            "stopped by SIGTERM: writing what was recorded (\"complete\": false); SIGKILL ends it at once")
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    _sigterm_installed.append(owner)
    _start_sigterm_watchdog(grace_s)


def _after_fork_in_child() -> None:
    if _sigterm_installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            signal.set_wakeup_fd(-1)  # the parent's watchdog socket is not this process's
        except ValueError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _start_sigterm_watchdog(grace_s: float) -> None:
    """The watchdog of :func:`stop_on_sigterm` (skipped when another wakeup fd is in use, e.g. asyncio's)."""
    import socket

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        reader.close()
        writer.close()
        return
    if previous != -1:  # someone else's: keep it
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
        return

    def watch():
        while True:
            data = reader.recv(64)
            if not data:
                return
            if signal.SIGTERM in data:
                time.sleep(grace_s)
                sys.stderr.write(f"SIGTERM: the process did not end within {grace_s:g} s (blocked outside Python); "
                                 "ended without writing the routing trace or the MoE summary\n")
                sys.stderr.flush()
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="fairseq_moe_infer-sigterm-watchdog", daemon=True).start()
    _sigterm_installed.append((reader, writer))  # keep the sockets open


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
