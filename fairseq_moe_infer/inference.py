"""Inference-time MoE options shared by the ``moe_*`` tasks (``--moe-gating`` ...).

They are task options, not model options, so that ``fairseq-generate`` /
``fairseq-eval-lm`` can apply them to any checkpoint: the task calls
:func:`configure_moe` on every model it builds.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from torch import nn

from .cli import exit_with_error
from .moe import DISPATCHERS, MoEConfigError, moe_layers
from .report import MoERunReport


@dataclass
class MoEInferenceConfig(FairseqDataclass):
    """``--moe-gating``, ``--moe-eval-capacity-token-fraction``, ``--moe-stats-json``, ``--moe-collective-timeout``."""

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
    moe_collective_timeout: float = field(
        default=0.0,
        metadata={
            "help": "expert parallelism: seconds a collective may wait for the other ranks before every rank exits "
            "with one line naming the rank that stopped (0 = torch's process-group default: 30 min gloo, 10 min NCCL)"
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
    timeout = getattr(cfg, "moe_collective_timeout", 0.0)
    if problem is None and not (math.isfinite(timeout) and timeout >= 0):
        problem = f"--moe-collective-timeout must be a finite number of seconds >= 0 (0 = torch's default), got {timeout}"
    if problem:
        exit_with_error(problem)


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
    return MoERunReport(model, cfg.moe_gating, cfg.moe_eval_capacity_token_fraction, cfg.moe_stats_json).register_atexit()


__all__ = ["MoEInferenceConfig", "configure_moe", "validate_inference_options", "MoEConfigError"]
