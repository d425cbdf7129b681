"""Bounded waits for expert-parallel runs (``--moe-collective-timeout SECONDS``).

Every MoE layer forward is a collective, so a rank that stops (SIGSTOP, a hung device) or dies
would leave the others waiting: on gloo up to torch's 30-minute default, silently.
:func:`bound_collective_waits` (called by the ``moe_*`` tasks when they build a model, on
every rank of ``fairseq-train`` / ``fairseq-eval-lm`` / ``fairseq-generate`` /
``fairseq-interactive``):

* sets the default process group's timeout to the given seconds (gloo and NCCL honour it;
  on NCCL the wait raises only with ``TORCH_NCCL_BLOCKING_WAIT=1``, otherwise torch's
  watchdog aborts the process after the timeout);
* starts a daemon thread that writes a heartbeat (the time) for this rank into the
  process group's rendezvous store once a second (stopped by :func:`end_expert_parallel_run`,
  or at the latest by an ``atexit`` handler: ``fairseq-train`` has no end-of-run hook);
* installs a ``sys.excepthook`` that turns a failed collective (``torch.distributed``'s
  ``DistError`` / gloo's "Connection closed by peer" / a timeout) into ONE line naming the
  rank that stopped (the one whose heartbeat is older than a few seconds; rank 0 when the
  store it hosts does not answer), and exits with status 1. Before that line it runs the
  writers registered with :func:`at_lost_rank` (the routing trace, the MoE summary: local
  files, marked incomplete, no collective), bounded by ``LOST_RANK_WRITE_S``; the atexit handlers
  are skipped (``os._exit``), as a collective or gloo's teardown there would wait on the lost rank.

:func:`end_expert_parallel_run` is the other end: the tools' expert-parallel paths (generate,
interactive, eval-lm) call it once every rank has finished its work. It runs the end-of-run
collectives registered with :func:`at_end_of_run` (the run summary's per-GPU loads) while all
ranks are still there, waits for all ranks (a barrier, bounded like every wait), stops the
heartbeat, destroys the process group and drops the references to it (the MoE layers'
``group``, fairseq's cached global group), so that it is freed now, not during interpreter
teardown. Leaving gloo's process group and the heartbeat to the
interpreter's exit made ranks abort at exit ("terminate called without an active exception",
status -6) after a correct run, and a collective in an ``atexit`` handler could meet a rank
that had already gone.
"""

import atexit
import datetime
import logging
import os
import sys
import threading
import time
from typing import Optional

import torch.distributed as dist

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STALE_S = 4.0
_KEY = "moe_heartbeat/{}"
_state = {"installed": False, "timeout": None}
_stop = threading.Event()
_heartbeat: list = []  # the heartbeat thread, once started
_END_HOOKS: list = []
_LOST_RANK_WRITERS: list = []
LOST_RANK_WRITE_S = 30.0  # seconds the writers may take after a lost rank before the process ends anyway
_RELEASE_HOOKS: list = []


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _beat(store, rank: int) -> None:
    while not _stop.is_set():
        try:
            store.set(_KEY.format(rank), repr(time.time()))
        except Exception:  # the store's host is gone: nothing left to report to
            return
        _stop.wait(HEARTBEAT_S)


def _stop_heartbeat() -> None:
    # Also an ``atexit`` handler (``fairseq-train`` has no end-of-run hook): a daemon thread still
    # inside the store's C++ ``set`` when the interpreter finalizes is ended by pthread_exit, whose
    # forced unwind through pybind11's noexcept frames aborts the process ("terminate called without
    # an active exception", status -6) after a correct run; with a 0.2 ms beat, 2 of 12 two-rank
    # fairseq-train processes did, 0 of 48 with this handler
    _stop.set()
    for beat in _heartbeat:
        beat.join(timeout=2 * HEARTBEAT_S)
    _heartbeat.clear()


def stopped_rank(wait_s: float = 2 * STALE_S) -> Optional[str]:
    """The rank that stopped answering, as text (``"rank 1"``), found from the heartbeats;
    waits up to ``wait_s`` for a heartbeat to go stale (a rank killed a moment ago). None
    if every rank still beats."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=STALE_S))
        deadline = time.time() + wait_s
        while True:
            now = time.time()
            for r in range(world):
                key = _KEY.format(r)
                if r == rank:
                    continue
                if not store.check([key]):  # never beat: it stopped before it built its model
                    return f"rank {r}"
                if now - float(store.get(key).decode()) > STALE_S:
                    return f"rank {r}"
            if time.time() > deadline:
                return None
            time.sleep(HEARTBEAT_S / 2)
    except Exception:
        return "rank 0 (its rendezvous store does not answer)"


def _is_collective_failure(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc)
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError"}) or (
        isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "Connection closed by peer", "Timed out", "NCCL")))


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        if not _is_collective_failure(exc) or not dist.is_initialized():
            return previous(exc_type, exc, tb)
        rank, world = dist.get_rank(), dist.get_world_size()
        who = stopped_rank() or "another rank"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc_type.__name__
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
        _write_what_was_recorded()
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: error: expert-parallel rank {rank} of {world}: {who} stopped taking part in the "
                         f"collectives (timeout {_state['timeout']}); exiting ({first})\n")
        sys.stderr.flush()
        os._exit(1)  # the process group's threads may wait on the lost rank at interpreter exit

    return hook


def at_lost_rank(fn) -> None:
    """Register ``fn()`` (no arguments) to run when this rank ends because another stopped (see the
    module docstring): a writer of local files only (no collective: the other rank is gone)."""
    _LOST_RANK_WRITERS.append(fn)


def _write_what_was_recorded() -> None:
    from .cli import mark_lost_rank

    mark_lost_rank()
    watchdog = threading.Timer(LOST_RANK_WRITE_S, os._exit, (1,))  # a writer stuck on a lost rank's resource
    watchdog.daemon = True
    watchdog.start()
    for fn in _LOST_RANK_WRITERS:
        try:
            fn()
        except Exception as e:  # the error line below still comes; say what was not written
            logger.warning("after the lost rank, %s failed: %s", getattr(fn, "__qualname__", fn), e)


def bound_collective_waits(timeout_s: float) -> None:
    """Apply ``--moe-collective-timeout`` on this rank (see the module docstring); no-op without a
    process group of several ranks. ``timeout_s`` 0 keeps torch's default timeout (30 min gloo,
    10 min NCCL) but still reports a lost rank in one line.

    Raises:
        ValueError: ``timeout_s`` negative or not finite (the task validates it before).
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if timeout_s > 0:
        from torch.distributed import distributed_c10d

        distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), None)
        _state["timeout"] = f"{timeout_s:g} s"
    elif _state["timeout"] is None:
        _state["timeout"] = "torch's default"
    if _state["installed"]:
        return
    _state["installed"] = True
    _stop.clear()
    beat = threading.Thread(target=_beat, args=(_store(), dist.get_rank()), daemon=True, name="moe-heartbeat")
    beat.start()
    _heartbeat.append(beat)
    atexit.register(_stop_heartbeat)
    sys.excepthook = _excepthook(sys.excepthook)


def at_end_of_run(fn, after_teardown: bool = False) -> None:
    """Register ``fn()`` (no arguments) to run in :func:`end_expert_parallel_run`: before the
    process group goes, for end-of-run collectives (every rank registers the same functions in
    the same order, so their collectives match); with ``after_teardown``, after it is destroyed,
    to drop references to it (see :func:`end_expert_parallel_run`)."""
    (_RELEASE_HOOKS if after_teardown else _END_HOOKS).append(fn)


def end_expert_parallel_run() -> None:
    """End an expert-parallel tool run on this rank (see the module docstring): run the
    :func:`at_end_of_run` functions, barrier, stop the heartbeat, destroy the process group.
    Every rank must call it once, after its last MoE forward; no-op without a process group.

    Raises:
        whatever a hook or the barrier raises (a lost rank: the one-line report of
        :func:`bound_collective_waits`'s excepthook).
    """
    hooks, _END_HOOKS[:] = list(_END_HOOKS), []
    releases, _RELEASE_HOOKS[:] = list(_RELEASE_HOOKS), []
    if not (dist.is_available() and dist.is_initialized()):
        return
    for fn in hooks:
        fn()
    dist.barrier()
    _stop_heartbeat()
    _state["installed"] = False
    dist.destroy_process_group()
    # a destroyed gloo process group still referenced at interpreter teardown (a MoE layer's
    # ``group``, fairseq's cached global group) is freed there, and that aborted 4 of 12 two-rank
    # runs in a minimal reproduction ("terminate called without an active exception"); freed
    # here, 0 of 12
    for fn in releases:
        fn()
    try:
        from fairseq.distributed import utils as fairseq_distributed

        fairseq_distributed.get_global_group.__dict__.pop("_global_group", None)
    except ImportError:  # pragma: no cover - fairseq is a dependency
        pass
    import gc

    gc.collect()
