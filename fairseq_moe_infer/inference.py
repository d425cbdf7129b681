"""Inference-time MoE options shared by the ``moe_*`` tasks (``--moe-gating`` ...).

They are task options, not model options, so that ``fairseq-generate`` /
``fairseq-eval-lm`` can apply them to any checkpoint: the task calls
:func:`configure_moe` on every model it builds.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from torch import nn

from .cli import exit_with_error
from .moe import DISPATCHERS, MoEConfigError, moe_layers
from .moe.placement import LayerPlacement, Placement, load_placement
from .report import MoERunReport
from .trace import TraceRecorder


@dataclass
class MoEInferenceConfig(FairseqDataclass):
    """``--moe-gating``, ``--moe-eval-capacity-token-fraction``, ``--moe-stats-json``, ``--moe-record-trace``,
    ``--moe-placement``."""

    moe_gating: str = field(
        default="static",
        metadata={
            "help": "how tokens reach experts: static (fairseq/GShard fixed capacity, one-hot dispatch, "
            "drops overflow) | dynamic (sorted by expert, exact counts, drops nothing)"
        },
    )
    moe_eval_capacity_token_fraction: float = field(
        default=0.25,
        metadata={
            "help": "static gating at evaluation: capacity per expert = ceil(fraction * tokens in the batch) "
            "(fairseq default 0.25; 0 = the training capacity factor); ignored by dynamic gating"
        },
    )
    moe_stats_json: Optional[str] = field(
        default=None, metadata={"help": "write the end-of-run MoE summary (tokens/s, drops, tokens per expert) here"}
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


def validate_inference_options(cfg) -> None:
    """Exit with one line on a bad ``--moe-gating`` / fraction (CLI entry points)."""
    problem = None
    if cfg.moe_gating not in DISPATCHERS:
        problem = f"unknown --moe-gating '{cfg.moe_gating}'; choose one of {', '.join(sorted(DISPATCHERS))}"
    elif cfg.moe_eval_capacity_token_fraction < 0:
        problem = (
            f"--moe-eval-capacity-token-fraction must be >= 0, got {cfg.moe_eval_capacity_token_fraction} "
            "(0 = training capacity factor; use --moe-gating dynamic to drop nothing)"
        )
    elif getattr(cfg, "moe_record_trace", None) and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.moe_record_trace))):
        problem = f"--moe-record-trace {cfg.moe_record_trace}: its folder does not exist; create it or pick another path"
    if problem is None and getattr(cfg, "moe_placement", None):
        try:
            load_placement(cfg.moe_placement)
        except MoEConfigError as e:
            problem = str(e)
    if problem:
        exit_with_error(problem)


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


def configure_moe(model: nn.Module, cfg) -> Optional[MoERunReport]:
    """Apply the inference options to every :class:`MoELayer` of ``model``.

    Returns:
        an :class:`MoERunReport` registered to print at exit, or None if the
        model has no MoE layer.

    Raises:
        MoEConfigError: bad option values (see :func:`validate_inference_options`).
    """
    layers = moe_layers(model)
    if not layers:
        return None
    for m in layers:
        m.set_gating(cfg.moe_gating, cfg.moe_eval_capacity_token_fraction)
    if getattr(cfg, "moe_placement", None):
        try:
            apply_placement(model, load_placement(cfg.moe_placement))
        except MoEConfigError as e:
            exit_with_error(str(e))
    if getattr(cfg, "moe_record_trace", None):
        TraceRecorder(model, cfg.moe_record_trace).register_atexit()
    return MoERunReport(model, cfg.moe_gating, cfg.moe_eval_capacity_token_fraction, cfg.moe_stats_json).register_atexit()


__all__ = ["MoEInferenceConfig", "apply_placement", "configure_moe", "validate_inference_options", "MoEConfigError"]
