"""Test isolation for the plugin's process-wide exit state.

``fairseq_moe_infer.cli`` records, for the exit-time writers (routing trace, MoE summary), how the
process is ending: a problem passed to ``exit_with_error`` (tests catch its ``SystemExit``), a
SIGTERM, or an uncaught exception (``sys.last_type``, which pytest also sets for a failed test).
In a tool that state is final; in the test process it would leak into every later test (a trace
finished by a later test was marked "stopped by error"). Each test starts without it.


:func:`mt_generate_traced` runs ``fairseq-generate`` of the bundled MT model once per session with
``--moe-record-trace``: the reference output and trace of the buffering, prefetch and trace tests.
"""

import sys
from collections import namedtuple

import pytest


@pytest.fixture(autouse=True)
def _fresh_exit_state():
    from fairseq_moe_infer import cli

    def clear():
        cli._failed.clear()
        cli._stopped_by.clear()
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)

    clear()
    yield
    clear()


TracedRun = namedtuple("TracedRun", "text trace")


@pytest.fixture(scope="session")
def mt_generate_traced(tmp_path_factory):
    """``fairseq-generate`` with ``helpers.MT_ARGS`` and ``--moe-record-trace``: its stdout + stderr and the trace's
    path (shared: read it, do not change it)."""
    from .helpers import MT_ARGS, ok, run

    trace = tmp_path_factory.mktemp("mt_generate_traced") / "mt.npz"
    return TracedRun(ok(run("generate", MT_ARGS + ["--moe-record-trace", trace])), str(trace))
