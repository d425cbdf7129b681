"""``moe_translation``: fairseq's ``translation`` plus the MoE inference options."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..inference import MoEInferenceConfig, validate_inference_options
from .moe_task import MoETaskMixin


@dataclass
class MoETranslationConfig(TranslationConfig, MoEInferenceConfig):
    """fairseq's translation options plus ``--moe-gating`` & co."""


@register_task("moe_translation", dataclass=MoETranslationConfig)
class MoETranslationTask(MoETaskMixin, TranslationTask):
    """Translation whose models get ``--moe-gating`` / eval capacity applied on build."""

    def __init__(self, cfg, src_dict, tgt_dict):
        validate_inference_options(cfg)
        super().__init__(cfg, src_dict, tgt_dict)
