"""Inference-time MoE options shared by the ``moe_*`` tasks (``--moe-gating`` ...).

They are task options, not model options, so that ``fairseq-generate`` /
``fairseq-eval-lm`` can apply them to any checkpoint: the task calls
:func:`configure_moe` on every model it builds.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.dataclass import FairseqDataclass
from torch import nn

from .cli import exit_with_error
from .moe import MoEConfigError, moe_layers
from .moe.buffered import ExpertBuffer
from .moe.gate import Routing
from .moe.graphs import graph_conflict
from .moe.options import check_moe_options
from .moe.placement import LayerPlacement, Placement, load_placement
from .moe.prefetch import ExpertPredictor, build_predictor
from .report import MoERunReport
from .trace import TraceError, TraceRecorder, read_run_traces


def check_writable_path(path: Optional[str]) -> Optional[str]:
    """None if a file can be written at ``path`` (or no path), else the problem in words."""
    if not path:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist; create it first"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable"
    return None


@dataclass
class MoEInferenceConfig(FairseqDataclass):
    """``--moe-gating``, ``--moe-eval-capacity-token-fraction``, ``--moe-stats-json``, ``--moe-record-trace``,
    ``--moe-expert-buffer-size`` & co. (``--moe-prefetch``, ``--moe-cpu-experts``), ``--moe-placement``,
    ``--moe-cuda-graph-max-tokens``, ``--moe-collective-timeout``."""

    moe_gating: str = field(
        default="static",
        metadata={
            "help": "how tokens reach experts: static (fairseq/GShard fixed capacity, one-hot dispatch, "
            "drops overflow) | dynamic (sorted by expert, exact counts, drops nothing)"
        },
    )
    moe_eval_capacity_token_fraction: Optional[float] = field(
        default=None,
        metadata={
            "help": "static gating at evaluation: capacity per expert = ceil(fraction * tokens in the batch) "
            "(0 = the training capacity factor); ignored by dynamic gating. Default: the fraction a checkpoint "
            "converted from fairseq's MoE branch stores (logged), else fairseq's 0.25"
        },
    )
    moe_stats_json: Optional[str] = field(
        default=None, metadata={"help": "write the end-of-run MoE summary (tokens/s, drops, tokens per expert) here"}
    )
    moe_expert_buffer_size: int = field(
        default=0,
        metadata={
            "help": "expert buffering: keep K experts of each MoE layer (per rank) in device slots and all of them in "
            "pinned CPU memory, copying missed experts in before they run (0 = all experts resident)"
        },
    )
    moe_buffer_policy: str = field(
        default="lifo",
        metadata={"help": "expert buffering's eviction policy: lifo (the paper's) | lru | fifo | lfu | belady (offline "
                  "optimum, needs --moe-buffer-trace)"},
    )
    moe_buffer_trace: Optional[str] = field(
        default=None,
        metadata={"help": "routing trace (--moe-record-trace) of this model on the same data and flags, replayed by "
                  "--moe-buffer-policy belady"},
    )
    moe_prefetch: str = field(
        default="none",
        metadata={"help": "expert buffering: predict the experts of a layer's next call and start their copies early "
                  "(none | gate: the next MoE layer's gate applied to the current hidden states | previous-step: "
                  "the K busiest experts of the layer's previous call, i.e. the previous decoding step); needs "
                  "--moe-expert-buffer-size"},
    )
    moe_cpu_experts: str = field(
        default="off",
        metadata={"help": "expert buffering: off | auto (run a missed expert that received few tokens on the CPU from "
                  "its host copy when the measured copy and compute rates make that cheaper than copying it in); "
                  "needs --moe-expert-buffer-size"},
    )
    moe_record_trace: Optional[str] = field(
        default=None,
        metadata={
            "help": "record every evaluation MoE-layer call's top-k expert choices to this .npz routing trace "
            "(fairseq_moe_infer/trace.py; expert-parallel rank r > 0 writes PATH.rank<r>)"
        },
    )
    moe_placement: Optional[str] = field(
        default=None,
        metadata={
            "help": "expert placement JSON (scripts/plan_placement.py): per MoE layer the logical expert held by "
            "each of world_size * slots_per_rank expert slots (spare slots hold replicas); default: contiguous "
            "shards (rank r holds experts [r*E/W, (r+1)*E/W))"
        },
    )
    moe_cuda_graph_max_tokens: int = field(
        default=0,
        metadata={
            "help": "inference on one GPU with --moe-gating dynamic: MoE-layer calls of at most N tokens (decoding "
            "steps) replay a CUDA graph captured once per power-of-two token count, padding the call to it "
            "(fairseq_moe_infer/moe/graphs.py); 0 = off. Not with expert parallelism, --moe-expert-buffer-size, "
            "--moe-record-trace"
        },
    )
    moe_collective_timeout: float = field(
        default=0.0,
        metadata={
            "help": "expert parallelism: seconds a collective may wait for the other ranks before every rank exits "
            "with one line naming the rank that stopped (0 = torch's process-group default: 30 min gloo, 10 min NCCL)"
        },
    )


def validate_inference_options(cfg) -> None:
    """Exit with one line on a bad ``--moe-*`` task option (CLI entry points; value rules:
    :func:`~fairseq_moe_infer.moe.options.check_moe_options`)."""
    try:
        check_moe_options(
            moe_gating=cfg.moe_gating,
            moe_eval_capacity_token_fraction=cfg.moe_eval_capacity_token_fraction,
            moe_expert_buffer_size=getattr(cfg, "moe_expert_buffer_size", None),
            moe_buffer_policy=getattr(cfg, "moe_buffer_policy", None),
            moe_prefetch=getattr(cfg, "moe_prefetch", None),
            moe_cpu_experts=getattr(cfg, "moe_cpu_experts", None),
            moe_collective_timeout=getattr(cfg, "moe_collective_timeout", None),
            moe_cuda_graph_max_tokens=getattr(cfg, "moe_cuda_graph_max_tokens", None),
        )
    except MoEConfigError as e:
        exit_with_error(str(e))
    problem = None
    if getattr(cfg, "moe_cuda_graph_max_tokens", 0):
        problem = graph_conflict(cfg.moe_gating, buffered=bool(getattr(cfg, "moe_expert_buffer_size", 0)),
                                 recording=bool(getattr(cfg, "moe_record_trace", None)))
    if getattr(cfg, "moe_expert_buffer_size", 0) and cfg.moe_buffer_policy == "belady" and not cfg.moe_buffer_trace:
        problem = ("--moe-buffer-policy belady replays a routing trace: give --moe-buffer-trace PATH "
                   "(recorded with --moe-record-trace on the same data and flags)")
    elif getattr(cfg, "moe_buffer_trace", None) and not (cfg.moe_expert_buffer_size and cfg.moe_buffer_policy == "belady"):
        problem = "--moe-buffer-trace is read only by --moe-buffer-policy belady with --moe-expert-buffer-size K > 0"
    if problem is None and getattr(cfg, "moe_placement", None):
        try:
            load_placement(cfg.moe_placement)
        except MoEConfigError as e:
            problem = str(e)
    if problem:
        exit_with_error(problem)
    for flag in ("moe_stats_json", "moe_record_trace"):
        problem = check_writable_path(getattr(cfg, flag, None))
        if problem:
            exit_with_error(f"--{flag.replace('_', '-')}: {problem}")
    # a file the run writes must not be another file of the run (it was overwritten silently)
    files = [(f, getattr(cfg, f, None)) for f in ("moe_stats_json", "moe_record_trace", "moe_buffer_trace", "moe_placement")]
    files = [(f"--{f.replace('_', '-')}", os.path.realpath(path)) for f, path in files if path]
    for i, (flag, path) in enumerate(files[:2]):
        other = next((f for f, p in files[i + 1:] if p == path), None)
        if other:
            exit_with_error(f"{flag} and {other} are the same file {path}: the run would overwrite it; give {flag} "
                            "a file of its own")


def apply_placement(model: nn.Module, placement: Placement) -> None:
    """Give every MoE layer of ``model`` its slots from ``placement`` (before the weights are
    loaded: each slot then loads its logical expert from the checkpoint).

    Raises:
        MoEConfigError: a placement for another world size, expert count or set of MoE layers.
    """
    named = moe_layers(model, named=True)
    world = named[0][1].placement.world_size
    experts = {m.num_experts for _, m in named}
    placement.check_model([n for n, _ in named], experts.pop() if len(experts) == 1 else -1, world)
    for name, m in named:
        m.set_placement(LayerPlacement(placement.layers[name], m.num_experts, world))


def eval_capacity_fraction(cfg, branch: Optional[dict] = None) -> float:
    """The evaluation capacity fraction in force: ``--moe-eval-capacity-token-fraction`` when given,
    else the one stored by a checkpoint converted from fairseq's MoE branch (``branch``:
    :func:`~fairseq_moe_infer.checkpoint.branch_settings_of`; logged), else fairseq's 0.25."""
    from .checkpoint import BRANCH_EVAL_CAPACITY_DEFAULT, branch_eval_capacity_fraction

    given = getattr(cfg, "moe_eval_capacity_token_fraction", None)
    if given is not None:
        return given
    stored = branch_eval_capacity_fraction(branch)
    return BRANCH_EVAL_CAPACITY_DEFAULT if stored is None else stored


def log_branch_settings(model: nn.Module, cfg, branch: dict) -> None:
    """One log line (and a warning where outputs cannot equal the branch's) saying which stored
    fairseq MoE-branch settings of a converted checkpoint are in force, and which the command line
    overrode (``--moe-eval-capacity-token-fraction``; model settings through ``--model-overrides``)."""
    import logging

    from .checkpoint import branch_eval_capacity_fraction

    logger = logging.getLogger("fairseq_moe_infer")
    layers = moe_layers(model)
    parts = []
    routed = layers[0].route_padding
    stored_routed = branch.get("use_moe_pad_mask") is False
    parts.append(f"use_moe_pad_mask={not routed} ({'padding routed' if routed else 'padding masked'}"
                 + ("" if routed == stored_routed else "; overrides the stored " + str(not stored_routed)) + ")")
    factor = layers[0].capacity_factor
    stored_factor = branch.get("moe_capacity_factor")
    overridden = "" if stored_factor in (None, factor) else f" (overrides the stored {stored_factor})"
    parts.append(f"moe_capacity_factor={factor}{overridden}")
    parts.append(f"moe_freq={branch.get('moe_freq')}")
    stored_fraction = branch_eval_capacity_fraction(branch)
    given = getattr(cfg, "moe_eval_capacity_token_fraction", None)
    if given is None:
        parts.append(f"moe_eval_capacity_token_fraction={stored_fraction}")
    else:
        parts.append(f"moe_eval_capacity_token_fraction={given} (--moe-eval-capacity-token-fraction; the stored "
                     f"{stored_fraction} not applied)")
    logger.info("checkpoint converted from fairseq's MoE branch: its stored settings apply: " + ", ".join(parts)
                + " (override a model setting with --model-overrides)")
    if branch.get("moe_batch_prioritized_routing"):
        logger.warning("the branch ordered capacity slots by gate probability (moe_batch_prioritized_routing); static "
                       "gating here fills them in token order: outputs equal the branch's only where nothing is dropped")


def configure_moe(model: nn.Module, cfg, branch: Optional[dict] = None) -> Optional[MoERunReport]:
    """Apply the inference options to every :class:`MoELayer` of ``model``.

    ``branch``: the stored settings of a checkpoint converted from fairseq's MoE branch
    (:func:`~fairseq_moe_infer.checkpoint.branch_settings_of`), whose evaluation capacity fraction
    applies unless ``--moe-eval-capacity-token-fraction`` is given (:func:`eval_capacity_fraction`).

    Returns:
        an :class:`MoERunReport` registered to print at exit, or None if the
        model has no MoE layer.

    Raises:
        MoEConfigError: bad option values (see :func:`validate_inference_options`).
    """
    layers = moe_layers(model)
    if not layers:
        return None
    fraction = eval_capacity_fraction(cfg, branch)
    for m in layers:
        m.set_gating(cfg.moe_gating, fraction)
    if branch is not None:
        log_branch_settings(model, cfg, branch)
    if getattr(cfg, "moe_placement", None):
        try:
            apply_placement(model, load_placement(cfg.moe_placement))
        except MoEConfigError as e:
            exit_with_error(str(e))
    if getattr(cfg, "moe_expert_buffer_size", 0):
        configure_buffering(model, cfg.moe_expert_buffer_size, cfg.moe_buffer_policy, cfg.moe_buffer_trace,
                            getattr(cfg, "moe_prefetch", "none"), getattr(cfg, "moe_cpu_experts", "off"))
    if getattr(cfg, "moe_record_trace", None):
        TraceRecorder(model, cfg.moe_record_trace).register_atexit()
    if getattr(cfg, "moe_cuda_graph_max_tokens", 0):
        configure_cuda_graphs(model, cfg.moe_cuda_graph_max_tokens)
    return MoERunReport(model, cfg.moe_gating, fraction, cfg.moe_stats_json).register_atexit()


def configure_cuda_graphs(model: nn.Module, max_tokens: int, capture: bool = True) -> None:
    """Let every MoE layer of ``model`` replay CUDA graphs for calls of at most ``max_tokens`` tokens
    (``--moe-cuda-graph-max-tokens``; :mod:`~fairseq_moe_infer.moe.graphs`), all layers' graphs in
    one memory pool (they replay one at a time). 0 turns graphs off.

    Raises:
        MoEConfigError: static gating, expert parallelism or expert buffering.
    """
    pool = torch.cuda.graph_pool_handle() if max_tokens and capture and torch.cuda.is_available() else None
    for m in moe_layers(model):
        m.set_cuda_graphs(max_tokens, capture, pool)


def configure_buffering(model: nn.Module, num_slots: int, policy: str = "lifo", trace_path: Optional[str] = None,
                        prefetch: str = "none", cpu_experts: str = "off") -> Optional[ExpertPredictor]:
    """Give every MoE layer's experts an :class:`~fairseq_moe_infer.moe.buffered.ExpertBuffer` of
    ``num_slots`` slots (``--moe-expert-buffer-size``), evicting by ``policy``; attach the prefetch
    predictor ``prefetch`` (``--moe-prefetch``, :mod:`~fairseq_moe_infer.moe.prefetch`) and run cheap
    missed experts on the CPU with ``cpu_experts="auto"`` (``--moe-cpu-experts``).

    For ``belady`` the routing trace ``trace_path`` (and its ``.rank<r>`` files) gives each layer's
    future lookups: the experts of this rank that any rank's tokens chose, call by call.

    Returns:
        the attached predictor (None for ``none``).

    Raises:
        MoEConfigError: K larger than the experts per rank, an unknown policy, predictor or CPU-expert
            mode, belady without a trace, or a trace of another model (other expert count or MoE layers).
    """
    named = moe_layers(model, named=True)
    check_moe_options(moe_prefetch=prefetch, moe_cpu_experts=cpu_experts)
    futures = {}
    if policy == "belady" and trace_path:
        futures = _belady_futures(trace_path, named)
    for name, m in named:
        m.experts.set_buffer(ExpertBuffer(m.experts.num_local_experts, num_slots, policy, futures.get(name),
                                          prefetch=prefetch, cpu_experts=cpu_experts))
    return build_predictor(prefetch, model) if prefetch != "none" else None


def _belady_futures(path: str, named) -> dict:
    names = [n for n, _ in named]
    E = named[0][1].num_experts
    try:
        traces = read_run_traces(path, num_experts=E, layer_names=names)
    except TraceError as e:
        raise MoEConfigError(f"--moe-buffer-trace: {e}") from None
    futures = {}
    for i, (name, m) in enumerate(named):
        lo, n = m.rank * m.placement.slots_per_rank, m.experts.num_local_experts  # this rank's physical slots
        per_rank = [_slots_used(t, i, m.placement)[:, lo : lo + n] for t in traces]
        calls = max(len(a) for a in per_rank)
        used = np.zeros((calls, n), dtype=bool)
        for a in per_rank:  # this rank's experts serve every rank's tokens
            used[: len(a)] |= a
        futures[name] = [np.flatnonzero(row).tolist() for row in used]
    return futures


def _slots_used(trace, layer: int, placement: LayerPlacement) -> np.ndarray:
    """[calls of ``layer``, W * S] bool: the physical slots of ``placement`` (``--moe-placement``) that
    received tokens in each call of the trace, its recorded logical choices routed as the layer routes
    them (:meth:`LayerPlacement.route`: the j-th choice of an expert goes to replica j mod n)."""
    if placement.is_identity:
        return trace.active(layer)
    host = LayerPlacement(placement.slots, placement.num_experts, placement.world_size)  # CPU buffers
    used = np.zeros((len(trace.calls_of(layer)), placement.num_slots), dtype=bool)
    for row, c in enumerate(trace.calls_of(layer)):
        idx = torch.from_numpy(trace.call_choices(c).astype(np.int64))
        valid = idx >= 0
        routing = Routing(idx.clamp(min=0), torch.zeros(idx.shape), valid, torch.zeros(()), placement.num_experts, False)
        used[row, host.route(routing).expert_indices[valid].unique().numpy()] = True
    return used


__all__ = ["MoEInferenceConfig", "apply_placement", "configure_moe", "configure_buffering", "configure_cuda_graphs",
           "validate_inference_options",
           "MoEConfigError"]
