"""``moe_cross_entropy``: fairseq's ``cross_entropy`` plus the weighted balancing loss."""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from .moe_loss import MoELossConfig, MoELossMixin


@dataclass
class MoECrossEntropyCriterionConfig(CrossEntropyCriterionConfig, MoELossConfig):
    """Cross-entropy options plus ``--moe-gate-loss-wt`` / ``--moe-gate-loss-combine-method``."""


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyCriterionConfig)
class MoECrossEntropyCriterion(MoELossMixin, CrossEntropyCriterion):
    """Token cross-entropy + ``moe_gate_loss_wt * sample_size * gate_loss`` (see ``moe_loss``)."""

    def __init__(self, task, sentence_avg, moe_gate_loss_wt=0.01, moe_gate_loss_combine_method="average"):
        super().__init__(task, sentence_avg)
        self._init_moe_loss(moe_gate_loss_wt, moe_gate_loss_combine_method)
