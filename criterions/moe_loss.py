"""The MoE balancing loss added to a fairseq loss, and its metrics.

As fairseq's MoE branch (``fairseq/criterions/moe_cross_entropy.py``):
``loss = inner_loss + moe_gate_loss_wt * sample_size * gate_loss`` where
``gate_loss`` is the average (or sum) over MoE layers of each layer's GShard
balancing loss ``l_aux``. Logged: ``inner_loss``, ``moe_gate_loss`` and the
percentage of top-k choices dropped for capacity (``moe_dropped_pct``).
"""

import math
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from ..cli import exit_with_error
from ..moe import MoEConfigError, moe_layers
from ..moe.options import check_moe_options

COMBINE_METHODS = ("average", "sum")


@dataclass
class MoELossConfig(FairseqDataclass):
    """``--moe-gate-loss-wt``, ``--moe-gate-loss-combine-method``."""

    moe_gate_loss_wt: float = field(
        default=0.01, metadata={"help": "weight of the balancing (gate) loss; fairseq's MoE recipes use 0.01"}
    )
    moe_gate_loss_combine_method: str = field(
        default="average", metadata={"help": "combine the layers' balancing losses by: average | sum"}
    )


class MoELossMixin:
    """Adds the weighted balancing loss of every :class:`MoELayer` after the inner loss.

    Put it before a fairseq criterion in the bases; it wraps that criterion's
    ``forward`` and ``reduce_metrics``.
    """

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        return self.add_moe_loss(model, loss, sample_size, logging_output), sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        cls.reduce_moe_metrics(logging_outputs)

    def _init_moe_loss(self, moe_gate_loss_wt: float, moe_gate_loss_combine_method: str) -> None:
        if moe_gate_loss_combine_method not in COMBINE_METHODS:
            exit_with_error(
                f"unknown --moe-gate-loss-combine-method '{moe_gate_loss_combine_method}'; "
                f"choose one of {', '.join(COMBINE_METHODS)}"
            )
        try:
            check_moe_options(moe_gate_loss_wt=moe_gate_loss_wt)
        except MoEConfigError as e:
            exit_with_error(str(e))
        self.moe_gate_loss_wt = moe_gate_loss_wt
        self.moe_gate_loss_combine_method = moe_gate_loss_combine_method

    def add_moe_loss(self, model, loss, sample_size, logging_output):
        """Return ``loss`` plus the weighted balancing loss; fill the logging output."""
        layers = [m for m in moe_layers(model) if m.l_aux is not None]
        logging_output["inner_loss"] = loss.data
        if not layers:
            return loss
        gate_loss = torch.stack([m.l_aux.float() for m in layers]).sum()
        if self.moe_gate_loss_combine_method == "average":
            gate_loss = gate_loss / len(layers)
        gate_loss = gate_loss * sample_size
        loss = loss + self.moe_gate_loss_wt * gate_loss.to(loss.dtype)
        logging_output["loss"] = loss.data
        logging_output["moe_gate_loss"] = gate_loss.data
        logging_output["moe_routed"] = torch.stack([m.last_stats.routed for m in layers]).sum()
        logging_output["moe_dropped"] = torch.stack([m.last_stats.dropped for m in layers]).sum()
        return loss

    @staticmethod
    def reduce_moe_metrics(logging_outputs) -> None:
        """Log ``inner_loss`` (base 2, per sample-size unit), ``moe_gate_loss`` and drops."""
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size == 0:
            return
        inner = sum(log.get("inner_loss", 0) for log in logging_outputs)
        metrics.log_scalar("inner_loss", inner / sample_size / math.log(2), sample_size, round=3)
        if any("moe_gate_loss" in log for log in logging_outputs):
            gate = sum(log.get("moe_gate_loss", 0) for log in logging_outputs)
            metrics.log_scalar("moe_gate_loss", gate / sample_size, sample_size, round=4)
            routed = sum(log.get("moe_routed", 0) for log in logging_outputs)
            dropped = sum(log.get("moe_dropped", 0) for log in logging_outputs)
            if routed > 0:
                metrics.log_scalar("moe_dropped_pct", 100.0 * float(dropped) / float(routed), float(routed), round=2)
