"""What both ``moe_*`` tasks add to their fairseq base task (a mixin, listed first)."""

import glob
import os

from .. import expert_parallel_generate as ep_generate
from ..bounded_waits import bound_collective_waits
from ..checkpoint import branch_settings_of
from ..cli import exit_with_error
from ..inference import configure_moe
from ..models.validation import cli_errors
from ..moe import moe_layers
from ..training import (
    check_expert_grads_finite,
    check_training_setup,
    prepare_expert_parallel_training,
    weightless_dummy_batch,
)


class MoETaskMixin:
    """Applies ``--moe-gating`` & co. to every model the task builds, prepares
    expert-parallel training when the experts are sharded over several ranks
    (:mod:`fairseq_moe_infer.training`), and checks fairseq's training setup once
    at the first training step; before each optimizer step all ranks agree on whether
    any expert gradient overflowed. With sharded experts, ``inference_step`` (generate,
    interactive, ``--eval-bleu`` validation) runs in a
    :class:`~fairseq_moe_infer.expert_parallel_generate.MoELockstep`, and
    ``--moe-collective-timeout`` bounds every collective wait
    (:mod:`fairseq_moe_infer.bounded_waits`). A dummy batch (``ignore_grad``) returns sample size 0
    and a zeroed logging output (:func:`~fairseq_moe_infer.training.weightless_dummy_batch`)."""

    weightless_dummy_batches = True  # read by fairseq_moe_infer.training.train_step

    def load_dataset(self, split, *args, **kwargs):
        """fairseq's loading; an empty split ends the tool with one line (fairseq failed in mmap with
        ``ValueError: cannot mmap an empty file``, or evaluated nothing)."""
        data = getattr(getattr(self, "cfg", None), "data", None) or getattr(getattr(self, "args", None), "data", "")
        problem = f"split '{split}' of {data} holds no sentences; check --gen-subset / --valid-subset and the data folder"
        folder = str(data).split(os.pathsep)[0]
        binaries = glob.glob(os.path.join(glob.escape(folder), f"{split}.bin"))
        binaries += glob.glob(os.path.join(glob.escape(folder), f"{split}.*.bin"))
        if binaries and all(os.path.getsize(b) == 0 for b in binaries):
            exit_with_error(problem)
        result = super().load_dataset(split, *args, **kwargs)
        if split in self.datasets and len(self.datasets[split]) == 0:
            exit_with_error(problem)
        return result

    def build_model(self, cfg, from_checkpoint=False):
        branch = branch_settings_of(cfg)  # a converted fairseq MoE-branch checkpoint's settings (fairseq drops the key)
        model = super().build_model(cfg, from_checkpoint)
        task_cfg = self.cfg if getattr(self, "cfg", None) is not None else self.args
        bound_collective_waits(getattr(task_cfg, "moe_collective_timeout", 0.0))  # before any MoE collective
        with cli_errors():  # a bad --moe-* value for this model (e.g. buffer size, trace): one line
            configure_moe(model, task_cfg, branch)
        prepare_expert_parallel_training(model)
        ep_generate.note_built_model(model)
        return model

    def inference_step(self, generator, models, sample, **kwargs):
        # beam searches end after different step counts on different ranks: keep the ranks'
        # MoE collectives in step (fairseq_moe_infer/expert_parallel_generate.py)
        lockstep = ep_generate.lockstep_for(models)
        if lockstep is None:
            return super().inference_step(generator, models, sample, **kwargs)
        ep_generate.note_batch(models, sample)
        with lockstep:
            return super().inference_step(generator, models, sample, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if not getattr(self, "_moe_setup_checked", False):
            if any(m.experts.buffer is not None for m in moe_layers(model)):
                exit_with_error("--moe-expert-buffer-size is for inference (fairseq-generate, fairseq-interactive, "
                                "fairseq-eval-lm); drop it when training")
            if any(m.graphs is not None for m in moe_layers(model)):
                exit_with_error("--moe-cuda-graph-max-tokens is for inference (fairseq-generate, fairseq-interactive, "
                                "fairseq-eval-lm); drop it when training")
            check_training_setup(model, optimizer)
            self._moe_setup_checked = True
        loss, sample_size, logging_output = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        if ignore_grad:  # fairseq's dummy batch (a rank's share of the epoch ran out): it weighs nothing
            sample_size, logging_output = weightless_dummy_batch(sample_size, logging_output)
        return loss, sample_size, logging_output

    def optimizer_step(self, optimizer, model, update_num):
        check_expert_grads_finite(model, optimizer)
        super().optimizer_step(optimizer, model, update_num)
