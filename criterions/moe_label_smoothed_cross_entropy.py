"""``moe_label_smoothed_cross_entropy``: fairseq's label-smoothed loss plus the balancing loss."""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from .moe_loss import MoELossConfig, MoELossMixin


@dataclass
class MoELabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig, MoELossConfig):
    """Label-smoothed cross-entropy options plus the balancing-loss options."""


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoELabelSmoothedCrossEntropyCriterionConfig)
class MoELabelSmoothedCrossEntropyCriterion(MoELossMixin, LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy + ``moe_gate_loss_wt * sample_size * gate_loss``."""

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        moe_gate_loss_wt=0.01,
        moe_gate_loss_combine_method="average",
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self._init_moe_loss(moe_gate_loss_wt, moe_gate_loss_combine_method)
