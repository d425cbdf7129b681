"""``moe_translation``: fairseq's ``translation`` plus the MoE inference options."""

import logging
import re
from dataclasses import dataclass
from typing import List

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..cli import exit_with_error
from ..inference import MoEInferenceConfig, validate_inference_options
from .moe_task import MoETaskMixin

logger = logging.getLogger(__name__)


@dataclass
class MoETranslationConfig(TranslationConfig, MoEInferenceConfig):
    """fairseq's translation options plus ``--moe-gating`` & co."""


@register_task("moe_translation", dataclass=MoETranslationConfig)
class MoETranslationTask(MoETaskMixin, TranslationTask):
    """Translation whose models get ``--moe-gating`` / eval capacity applied on build."""

    def __init__(self, cfg, src_dict, tgt_dict):
        validate_inference_options(cfg)
        super().__init__(cfg, src_dict, tgt_dict)
        self.target_tags = target_tags(src_dict)

    def check_source_line(self, line: str) -> None:
        """A raw fairseq-interactive input line (called by the plugin's wrap of fairseq-interactive's
        ``make_batches``). With a multilingual model (target tags ``<2xx>`` in the source dictionary)
        a line starting with an unknown tag ends the run with one line listing the known tags; a line
        without a tag is translated with a warning (the bundled model never saw one in training: it
        picks some target language itself)."""
        if not self.target_tags:
            return
        m = _LEADING_TAG.match(line)
        if m is None:
            logger.warning("input line without a target tag (%s): the model picks the target language itself: %s",
                           ", ".join(self.target_tags), line[:60])
        elif m.group(1) not in self.target_tags:
            exit_with_error(f"unknown target tag {m.group(1)} in '{line[:60]}'; the model knows {', '.join(self.target_tags)}")


_TAG = re.compile(r"<2[^<>\s]+>")
_LEADING_TAG = re.compile(r"\s*(<2[^<>\s]*>)")


def target_tags(dictionary) -> List[str]:
    """The target-language tags (``<2de>`` ...) of a multilingual model's source dictionary."""
    return sorted(s for s in dictionary.symbols if _TAG.fullmatch(s))
