"""``moe_language_modeling``: fairseq's ``language_modeling`` plus the MoE inference options."""

from dataclasses import dataclass

import numpy as np
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from ..cli import exit_with_error
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

    def eval_lm_dataloader(self, dataset, max_tokens=36000, batch_size=None, max_positions=None, *args,
                           context_window: int = 0, num_shards: int = 1, **kwargs):
        """fairseq's eval-lm batches; ``--context-window`` over several ranks is refused with one line:
        fairseq hands rank r the batches r, r + N, ..., so each rank would take its context from its own
        previous batch, not the preceding text (a perplexity unlike one process's), and a rank's empty
        padding batch crashes fairseq's context-window collater. Samples longer than the model's positions
        are refused with one line: fairseq-eval-lm skipped them with a warning and printed the perplexity of
        the rest, exit 0 (``--tokens-per-sample 2000`` on a 256-position model: perplexity 1.00 over 0 tokens)."""
        if context_window > 0 and num_shards > 1:
            exit_with_error(
                f"--context-window with {num_shards} ranks: each rank would take its context from its own previous "
                "batch, not the preceding text; evaluate with --context-window on one process"
            )
        if max_positions is not None:
            _, too_long = dataset.filter_indices_by_size(np.arange(len(dataset), dtype=np.int64), max_positions)
            if len(too_long):
                fix = f"--tokens-per-sample <= {max_positions}"
                if self.args.sample_break_mode == "eos":  # a block is a line
                    fix = f"--sample-break-mode none with {fix}"
                exit_with_error(f"{len(too_long):,} of the set's {len(dataset):,} samples are longer than the model's "
                                f"{max_positions} positions: fairseq-eval-lm would skip them and print the perplexity of "
                                f"the rest (1.00 over 0 tokens when all are); use {fix}")
        return super().eval_lm_dataloader(dataset, max_tokens, batch_size, max_positions, *args, context_window=context_window,
                                          num_shards=num_shards, **kwargs)
