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
from .moe import MoEConfigError, moe_layers
from .moe.options import check_moe_options
from .report import MoERunReport
from .trace import TraceRecorder


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
    """``--moe-gating``, ``--moe-eval-capacity-token-fraction``, ``--moe-stats-json``, ``--moe-record-trace``."""

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


def validate_inference_options(cfg) -> None:
    """Exit with one line on a bad ``--moe-gating`` / fraction / ``--moe-stats-json`` (CLI entry points;
    rules: :func:`~fairseq_moe_infer.moe.options.check_moe_options`)."""
    try:
        check_moe_options(moe_gating=cfg.moe_gating, moe_eval_capacity_token_fraction=cfg.moe_eval_capacity_token_fraction)
    except MoEConfigError as e:
        exit_with_error(str(e))
    for flag in ("moe_stats_json", "moe_record_trace"):
        problem = check_writable_path(getattr(cfg, flag, None))
        if problem:
            exit_with_error(f"--{flag.replace('_', '-')}: {problem}")


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
    if getattr(cfg, "moe_record_trace", None):
        TraceRecorder(model, cfg.moe_record_trace).register_atexit()
    return MoERunReport(model, cfg.moe_gating, cfg.moe_eval_capacity_token_fraction, cfg.moe_stats_json).register_atexit()


__all__ = ["MoEInferenceConfig", "configure_moe", "validate_inference_options", "MoEConfigError"]
