"""``moe_language_modeling``: fairseq's ``language_modeling`` plus the MoE inference options."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from ..inference import MoEInferenceConfig, validate_inference_options
from .moe_task import MoETaskMixin


@dataclass
class MoELanguageModelingConfig(LanguageModelingConfig, MoEInferenceConfig):
    """fairseq's language-modelling options plus ``--moe-gating`` & co."""


@register_task("moe_language_modeling", dataclass=MoELanguageModelingConfig)
class MoELanguageModelingTask(MoETaskMixin, LanguageModelingTask):
    """Language modelling whose models get ``--moe-gating`` / eval capacity applied on build."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        validate_inference_options(args)
        super().__init__(args, dictionary, output_dictionary, targets)
