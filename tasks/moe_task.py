"""What both ``moe_*`` tasks add to their fairseq base task (a mixin, listed first)."""

from ..cli import exit_with_error
from ..inference import configure_moe
from ..models.validation import cli_errors
from ..moe import moe_layers
from ..training import check_expert_grads_finite, check_training_setup, prepare_expert_parallel_training


class MoETaskMixin:
    """Applies ``--moe-gating`` & co. to every model the task builds, prepares
    expert-parallel training when the experts are sharded over several ranks
    (:mod:`fairseq_moe_infer.training`), and checks fairseq's training setup once
    at the first training step; before each optimizer step all ranks agree on whether
    any expert gradient overflowed."""

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        with cli_errors():  # a bad --moe-* value for this model (e.g. buffer size, trace): one line
            configure_moe(model, self.cfg if getattr(self, "cfg", None) is not None else self.args)
        prepare_expert_parallel_training(model)
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if not getattr(self, "_moe_setup_checked", False):
            if any(m.experts.buffer is not None for m in moe_layers(model)):
                exit_with_error("--moe-expert-buffer-size is for inference (fairseq-generate, fairseq-interactive, "
                                "fairseq-eval-lm); drop it when training")
            check_training_setup(model, optimizer)
            self._moe_setup_checked = True
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def optimizer_step(self, optimizer, model, update_num):
        check_expert_grads_finite(model, optimizer)
        super().optimizer_step(optimizer, model, update_num)
