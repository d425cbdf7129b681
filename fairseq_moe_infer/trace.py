"""Routing traces: which experts each MoE-layer call chose, token by token (``--moe-record-trace``).

A trace is what the expert-buffering simulator, the Belady eviction policy and the
expert-placement planner read (Huang et al. 2024, Sec. 5 and Fig. 12 study expert
locality from such traces). The recorder is an observer, like
:class:`~fairseq_moe_infer.report.MoERunReport`: a forward hook on each MoE layer's gate
copies the gate's top-k choices to the host (one copy per layer call); no dispatcher
knows about it, and outputs do not change. Only evaluation-mode forwards are recorded.

File format (numpy ``.npz`` written with ``np.savez_compressed``; ``FORMAT`` /
``VERSION`` below). Arrays:

==============  ==========  ==========================================================
``format``      0-d str     ``"fairseq_moe_infer.routing_trace"``
``version``     0-d int     1
``num_experts`` 0-d int     E, logical experts of the gate (all ranks)
``k``           0-d int     top-k
``world_size``  0-d int     expert-parallel ranks of the run
``rank``        0-d int     the rank that wrote the file
``complete``    0-d bool    False when the run was interrupted (SIGTERM, SIGINT) or ended by
                            an error: the calls before that are kept
``num_calls``   0-d int     N, the calls recorded (checked against ``call_layer``; optional:
                            files written before it was added have none)
``stopped_by``  0-d str     ``""`` (complete), ``"SIGTERM"``, ``"SIGINT"``, ``"error"`` or
                            ``"exception"`` (optional, as ``num_calls``)
``layer_names`` [L] str     MoE layer module names in model order
                            (``encoder.layers.1.moe_layer``, ``decoder.layers.3.moe_layer``)
``call_layer``  [N] int32   index into ``layer_names`` of each MoE-layer forward, in call order
``call_tokens`` [N] int64   non-padding tokens T_i of that call
``choices``     [sum T_i, k] int16  the expert of each non-padding token's top-k choices, call
                            after call in token order; -1 where the gate made no valid choice
==============  ==========  ==========================================================

Choices are the gate's (before any capacity dropping of static gating). A run stopped by SIGTERM
(``timeout``, ``kill``: :func:`fairseq_moe_infer.cli.stop_on_sigterm`) or SIGINT writes the calls
recorded so far, marked ``complete = False``; :func:`read_trace` refuses such a trace unless asked
(``allow_incomplete``) and always refuses a corrupt or truncated file. Under expert
parallelism every rank records its own tokens (global expert ids) to ``PATH`` (rank 0) or
``PATH.rank<r>``; :func:`merge_rank_traces` concatenates them.
"""

import atexit
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .cli import new_file_mode

FORMAT = "fairseq_moe_infer.routing_trace"
VERSION = 1


class TraceError(ValueError):
    """A routing trace that cannot be used; the one-line message names the problem and the fix."""


@dataclass
class RoutingTrace:
    """A routing trace in memory (see the module docstring for the arrays).

    Attributes:
        num_experts: E.  k: top-k.  world_size, rank: the writing process.
        complete: False for a trace of an interrupted run.
        stopped_by: why an incomplete run ended (``SIGTERM``, ``SIGINT``, ``error``, ``exception``), else "".
        layer_names: [L] MoE layer names.
        call_layer: [N] int32.  call_tokens: [N] int64.  choices: [sum T_i, k] int16.
        offsets: [N + 1] int64 start row of each call in ``choices`` (derived).
    """

    num_experts: int
    k: int
    layer_names: List[str]
    call_layer: np.ndarray
    call_tokens: np.ndarray
    choices: np.ndarray
    world_size: int = 1
    rank: int = 0
    complete: bool = True
    stopped_by: str = ""
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.layer_names = [str(n) for n in self.layer_names]
        self.call_layer = np.asarray(self.call_layer, dtype=np.int32).reshape(-1)
        self.call_tokens = np.asarray(self.call_tokens, dtype=np.int64).reshape(-1)
        self.choices = np.asarray(self.choices, dtype=np.int16).reshape(-1, self.k)
        self.offsets = np.concatenate([[0], np.cumsum(self.call_tokens)]).astype(np.int64)

    @property
    def num_calls(self) -> int:
        return len(self.call_layer)

    def layer_index(self, layer: Union[int, str]) -> int:
        """Index of ``layer`` (an index or a name) in :attr:`layer_names`.

        Raises:
            TraceError: no such layer.
        """
        if isinstance(layer, str):
            if layer not in self.layer_names:
                raise TraceError(f"the trace has no MoE layer '{layer}' (it has {', '.join(self.layer_names)})")
            return self.layer_names.index(layer)
        if not 0 <= int(layer) < len(self.layer_names):
            raise TraceError(f"the trace has {len(self.layer_names)} MoE layers, not layer {layer}")
        return int(layer)

    def call_choices(self, i: int) -> np.ndarray:
        """[T_i, k] int16: the choices of call ``i``."""
        return self.choices[self.offsets[i] : self.offsets[i + 1]]

    def calls_of(self, layer: Union[int, str]) -> List[int]:
        """Indices of the calls of ``layer`` (index or name), in call order."""
        return np.flatnonzero(self.call_layer == self.layer_index(layer)).tolist()

    def expert_counts(self, layer: Union[int, str]) -> np.ndarray:
        """[n_calls_of_layer, E] int64: tokens routed to each expert per call (-1 choices ignored)."""
        calls = self.calls_of(layer)
        out = np.zeros((len(calls), self.num_experts), dtype=np.int64)
        for row, i in enumerate(calls):
            c = self.call_choices(i).reshape(-1)
            c = c[c >= 0]
            out[row] = np.bincount(c, minlength=self.num_experts)
        return out

    def active(self, layer: Union[int, str]) -> np.ndarray:
        """[n_calls_of_layer, E] bool: experts that received at least one token per call."""
        return self.expert_counts(layer) > 0


def write_trace(path: str, trace: RoutingTrace) -> None:
    """Write ``trace`` to ``path`` (``.npz``, compressed) atomically: a temporary file in the same
    folder, then a rename, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".trace-", suffix=".npz")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                format=np.array(FORMAT),
                version=np.array(VERSION),
                num_experts=np.array(trace.num_experts),
                k=np.array(trace.k),
                world_size=np.array(trace.world_size),
                rank=np.array(trace.rank),
                complete=np.array(bool(trace.complete)),
                num_calls=np.array(trace.num_calls, dtype=np.int64),
                stopped_by=np.array(str(trace.stopped_by)),
                layer_names=np.array(trace.layer_names, dtype=str),
                call_layer=trace.call_layer.astype(np.int32),
                call_tokens=trace.call_tokens.astype(np.int64),
                choices=trace.choices.astype(np.int16),
            )
        os.chmod(tmp, new_file_mode())  # mkstemp creates it private; the umask decides, as for open()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_ARRAYS = ("format", "version", "num_experts", "k", "world_size", "rank", "complete", "layer_names",
           "call_layer", "call_tokens", "choices")
_OPTIONAL = ("num_calls", "stopped_by")


def read_trace(path: str, num_experts: Optional[int] = None, layer_names: Optional[Sequence[str]] = None,
               allow_incomplete: bool = False) -> RoutingTrace:
    """Read and check a trace written by :func:`write_trace`.

    Args:
        path: the ``.npz`` file.
        num_experts: E the caller's model has (checked when given).
        layer_names: the caller's MoE layer names in order (checked when given).
        allow_incomplete: accept a trace of an interrupted run.

    Raises:
        TraceError: (one line) missing file, not an npz, truncated, another format or version,
            inconsistent array sizes, an expert id out of range, an incomplete run, or another
            expert count / layer list than expected.
    """
    if not os.path.isfile(path):
        raise TraceError(f"routing trace {path} does not exist; record one with --moe-record-trace {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # an .npz is a zip archive
        what = "an empty file" if not magic else f"a file starting with {magic!r}"
        if magic == b"\x93NUM":
            what = "a single .npy array"
        raise TraceError(f"{path} is not a routing trace ({what}, not an .npz archive); record one with "
                         "--moe-record-trace")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in _ARRAYS if a not in z.files]
            if missing:
                raise TraceError(f"{path} is not a routing trace (no {', '.join(missing)}); record one with --moe-record-trace")
            arrays = {a: z[a] for a in _ARRAYS + _OPTIONAL if a in z.files}
    except TraceError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError: corrupt or truncated
        raise TraceError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); record the trace again") from None
    if str(arrays["format"]) != FORMAT:
        raise TraceError(f"{path} is not a routing trace (format '{arrays['format']}', expected '{FORMAT}')")
    if int(arrays["version"]) != VERSION:
        raise TraceError(f"{path} is routing trace version {int(arrays['version'])}; this plugin reads version "
                         f"{VERSION}: record it again with this version")
    E, k = int(arrays["num_experts"]), int(arrays["k"])
    names = [str(n) for n in arrays["layer_names"].reshape(-1)]
    call_layer, call_tokens, choices = arrays["call_layer"], arrays["call_tokens"], arrays["choices"]
    bad = None
    if call_layer.ndim != 1 or call_tokens.shape != call_layer.shape:
        bad = f"{call_layer.shape[0] if call_layer.ndim else 0} call layers but {call_tokens.size} call token counts"
    elif choices.ndim != 2 or choices.shape[1] != k:
        bad = f"choices of shape {tuple(choices.shape)}, expected [tokens, k={k}]"
    elif (call_tokens < 0).any() or int(call_tokens.sum()) != choices.shape[0]:
        bad = f"the calls' token counts sum to {int(call_tokens.sum())} but it holds {choices.shape[0]} tokens' choices"
    elif len(call_layer) and (call_layer.min() < 0 or call_layer.max() >= len(names)):
        bad = f"a call names MoE layer {int(call_layer.max())} of {len(names)}"
    elif choices.size and (choices.min() < -1 or choices.max() >= E):
        bad = f"an expert id out of range 0..{E - 1} ({int(choices.min())}..{int(choices.max())})"
    elif "num_calls" in arrays and int(arrays["num_calls"]) != len(call_layer):
        bad = f"its header counts {int(arrays['num_calls'])} calls but it holds {len(call_layer)}"
    if bad:
        raise TraceError(f"{path} is inconsistent: {bad}; record the trace again")
    stopped = str(arrays["stopped_by"]) if "stopped_by" in arrays else ""
    if not bool(arrays["complete"]) and not allow_incomplete:
        how = f" (stopped by {stopped} after {len(call_layer)} MoE-layer calls)" if stopped else ""
        raise TraceError(f"{path} is the trace of an interrupted run{how}; record it again to the end, or accept "
                         "a partial trace (allow_incomplete / --allow-incomplete)")
    if num_experts is not None and E != num_experts:
        raise TraceError(f"{path} was recorded with {E} experts per MoE layer but this model has {num_experts}; "
                         "record a trace of this model with --moe-record-trace")
    if layer_names is not None and list(layer_names) != names:
        raise TraceError(f"{path} was recorded on MoE layers {', '.join(names) or '(none)'} but this model has "
                         f"{', '.join(layer_names)}; record a trace of this model with --moe-record-trace")
    return RoutingTrace(E, k, names, call_layer, call_tokens, choices, int(arrays["world_size"]), int(arrays["rank"]),
                        bool(arrays["complete"]), stopped)


def rank_path(path: str, rank: int) -> str:
    """The file rank ``rank`` writes for ``--moe-record-trace path``."""
    return path if rank == 0 else f"{path}.rank{rank}"


def read_run_traces(path: str, num_experts: Optional[int] = None, layer_names: Optional[Sequence[str]] = None,
                    allow_incomplete: bool = False) -> List["RoutingTrace"]:
    """The traces of one run: ``path`` and, for an expert-parallel run, its ranks' files
    (:func:`rank_path`), in rank order, each checked as :func:`read_trace` checks it (the rank files
    against ``path``'s expert count and layer list).

    The ranks of one complete run call every MoE layer equally often (the collectives keep them in
    step), so complete files that differ in a layer's call count are of different runs (a rank file
    left from an earlier run) and are refused; the files of an interrupted run may differ.

    Raises:
        TraceError: a file is unusable, of another model than the first, or, all complete, with
            another number of calls of a layer than ``path``."""
    first = read_trace(path, num_experts, layer_names, allow_incomplete)
    ranks = [first] + [read_trace(rank_path(path, r), first.num_experts, first.layer_names, allow_incomplete)
                       for r in range(1, first.world_size)]
    if all(t.complete for t in ranks):
        for r, t in enumerate(ranks[1:], 1):
            for name in first.layer_names:
                mine, theirs = len(first.calls_of(name)), len(t.calls_of(name))
                if mine != theirs:
                    raise TraceError(f"{rank_path(path, r)} holds {theirs} calls of {name} but {path} holds {mine}: the "
                                     "files are of different runs; record the trace again (every rank writes its file)")
    return ranks


def merge_rank_traces(paths: Sequence[str], **read_kwargs) -> RoutingTrace:
    """One trace holding the calls of every file in ``paths`` (ranks of one expert-parallel run),
    concatenated in the order given.

    Raises:
        TraceError: a file is unusable or the files disagree on experts, k or layers.
    """
    traces = [read_trace(p, **read_kwargs) for p in paths]
    if not traces:
        raise TraceError("no routing trace files given")
    t0 = traces[0]
    for p, t in zip(paths, traces):
        if (t.num_experts, t.k, t.layer_names) != (t0.num_experts, t0.k, t0.layer_names):
            raise TraceError(f"{p} does not match {paths[0]} (experts, top-k or MoE layers differ); merge ranks of one run")
    return RoutingTrace(t0.num_experts, t0.k, t0.layer_names, np.concatenate([t.call_layer for t in traces]),
                        np.concatenate([t.call_tokens for t in traces]), np.concatenate([t.choices for t in traces]),
                        t0.world_size, 0, all(t.complete for t in traces),
                        next((t.stopped_by for t in traces if t.stopped_by), ""))


class TraceRecorder:
    """Records the routing of every evaluation-mode MoE-layer forward of ``model``.

    Args:
        model: a module holding :class:`~fairseq_moe_infer.moe.MoELayer` modules.
        path: output file (rank r > 0 of an expert-parallel run writes ``path.rank<r>``).

    Per call, the gate's [T, k] choices (padding rows and invalid choices -1) are copied to
    the host once, as int16, and the padding rows dropped there. Each call is appended as one
    record, so a run stopped at any point leaves whole calls only.
    """

    def __init__(self, model: nn.Module, path: str):
        from .moe import moe_layers
        from .moe.comm import expert_parallel_group

        layers = moe_layers(model, named=True)
        self.path = path
        _, self.world_size, self.rank = expert_parallel_group()  # now: the process group is gone at exit
        self.layer_names = [n for n, _ in layers]
        gates = [m.gate for _, m in layers]
        self.num_experts = gates[0].num_experts if gates else 0
        self.k = gates[0].k if gates else 0
        self.calls: List[tuple] = []  # (layer index, [T_i, k] int16 choices), one append per call
        self.interrupted = False
        self._done = False
        for i, g in enumerate(gates):
            g.register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(gate, args, routing):
            if gate.training:
                return
            c = torch.where(routing.valid, routing.expert_indices, -1).to(torch.int16).cpu().numpy()  # the host copy
            c = c[c[:, 0] >= 0]  # padding tokens have no valid first choice
            self.calls.append((index, c))

        return hook

    def trace(self) -> RoutingTrace:
        """The calls recorded so far (complete unless the run is ending by an interruption or error)."""
        from .cli import stopped_by

        calls = list(self.calls)
        choices = np.concatenate([c for _, c in calls]) if calls else np.zeros((0, self.k), dtype=np.int16)
        stopped = stopped_by() or ("exception" if self.interrupted else "")
        return RoutingTrace(self.num_experts, self.k, self.layer_names, np.array([i for i, _ in calls], dtype=np.int32),
                            np.array([len(c) for _, c in calls], dtype=np.int64), choices, self.world_size, self.rank,
                            not stopped, stopped)

    def finish(self) -> Optional[str]:
        """Write the trace once (at exit); returns the file written."""
        from .cli import mark_exiting

        if self._done:
            return None
        self._done = True
        mark_exiting()
        t = self.trace()
        out = rank_path(self.path, t.rank)
        write_trace(out, t)
        if not t.complete:
            logging.getLogger("fairseq_moe_infer").warning(
                "routing trace of an interrupted run (%s): the %d MoE-layer calls recorded are in %s (\"complete\": false)",
                t.stopped_by, t.num_calls, out)
        return out

    def register_atexit(self) -> "TraceRecorder":
        """Write at interpreter exit, also when the run is stopped by SIGINT (Ctrl-C) or SIGTERM
        (:func:`~fairseq_moe_infer.cli.stop_on_sigterm` is installed) or ends by an error: the trace
        is then marked incomplete. Python calls ``sys.excepthook`` before the atexit handlers: the
        recorder chains it (an uncaught exception marks the trace incomplete)."""
        from .bounded_waits import at_lost_rank
        from .cli import stop_on_sigterm

        previous = sys.excepthook

        def excepthook(*exc):
            self.interrupted = True
            previous(*exc)

        sys.excepthook = excepthook
        stop_on_sigterm()
        atexit.register(self.finish)
        at_lost_rank(self.finish)  # an expert-parallel rank stopped: the process ends without atexit
        return self
