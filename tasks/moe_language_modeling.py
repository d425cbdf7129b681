"""``moe_language_modeling``: fairseq's ``language_modeling`` plus the MoE inference options."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from ..inference import MoEInferenceConfig, configure_moe, validate_inference_options


@dataclass
class MoELanguageModelingConfig(LanguageModelingConfig, MoEInferenceConfig):
    """fairseq's language-modelling options plus ``--moe-gating`` & co."""


@register_task("moe_language_modeling", dataclass=MoELanguageModelingConfig)
class MoELanguageModelingTask(LanguageModelingTask):
    """Language modelling whose models get ``--moe-gating`` / eval capacity applied on build."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        validate_inference_options(args)
        super().__init__(args, dictionary, output_dictionary, targets)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        configure_moe(model, self.args)
        return model
