"""Every fairseq function this plugin wraps, in one list, with why (installed on import).

Each entry names the fairseq function, says why it is wrapped and which test fails without
the wrap; the wrapper itself is a small function ``wrapper(original, *args, **kwargs)`` kept
beside the code it serves (the stock tools' reliability wraps, which serve no other module, are
below). :func:`install_all` installs every entry once (idempotent: a wrapped
function carries ``_moe_wrapped``). Nothing else in the plugin replaces a fairseq function.
"""

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from . import checkpoint, expert_parallel_eval, training
from .cli import exit_with_error, in_fairseq_tool, loaded_tool_modules

logger = logging.getLogger("fairseq_moe_infer")


# ---- wrappers that serve no other module (reliability of the stock tools) -------------------------


def batch_by_size(original, indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                  required_batch_size_multiple=1, fixed_shapes=None):
    """``fairseq.data.data_utils.batch_by_size`` that hands the sentences fairseq dropped (the last
    batch, when its size is not a multiple of ``--required-batch-size-multiple``) over as one more
    batch; same arguments and result type otherwise."""
    if not isinstance(indices, np.ndarray):
        indices = np.fromiter(indices, dtype=np.int64, count=-1)
    batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                       required_batch_size_multiple, fixed_shapes)
    if fixed_shapes is None:  # batches cover a prefix of ``indices`` in order; fairseq dropped the rest
        covered = sum(len(b) for b in batches)
        if covered < len(indices):
            batches = list(batches) + [indices[covered:]]
    return batches


def load_model_ensemble_and_task(original, filenames, *args, **kwargs):
    """``checkpoint_utils.load_model_ensemble_and_task`` that ends the fairseq tools with one line
    when a ``--path`` file does not exist (fairseq raised ``IOError`` with a traceback)."""
    if in_fairseq_tool() and not kwargs.get("suffix") and kwargs.get("num_shards", 1) == 1:
        missing = [f for f in filenames if not os.path.exists(f)]
        if missing:
            exit_with_error(f"checkpoint {missing[0]} does not exist (check --path)")
    return original(filenames, *args, **kwargs)


def language_model_build_model(original, self, cfg, from_checkpoint=False):
    """``LanguageModelingTask.build_model`` that refuses a model which is not a language model
    (e.g. the MT checkpoint given to fairseq-eval-lm) with one line."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY, FairseqLanguageModel

    name = getattr(cfg, "_name", None) or getattr(cfg, "arch", None)
    model_cls = MODEL_REGISTRY.get(name) or ARCH_MODEL_REGISTRY.get(getattr(cfg, "arch", None))
    if isinstance(model_cls, type) and not issubclass(model_cls, FairseqLanguageModel):
        problem = (f"the checkpoint holds a {name} model ({model_cls.__name__}), not a language model; "
                   "language-model tasks (fairseq-eval-lm) need one such as assets/checkpoints/lm_moe; "
                   "score a translation model with fairseq-generate --task moe_translation")
        if in_fairseq_tool():
            exit_with_error(problem)
        raise ValueError(problem)
    return original(self, cfg, from_checkpoint)


def buffered_read(original, input, buffer_size):
    """fairseq-interactive's ``buffered_read`` reading bytes: a non-UTF-8 line is reported (number and
    byte offset) and skipped, the valid lines are translated (fairseq ended the run in
    ``UnicodeDecodeError``)."""
    stream = sys.stdin.buffer if input == "-" else open(input, "rb")
    buffer = []
    try:
        for number, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                logger.error("input line %d is not UTF-8 (byte %d: %s); skipped, later outputs are numbered without it",
                             number, e.start, e.reason)
                continue
            buffer.append(line.strip())
            if len(buffer) >= buffer_size:
                yield buffer
                buffer = []
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if buffer:
        yield buffer


def make_batches(original, lines, cfg, task, *args, **kwargs):
    """fairseq-interactive's ``make_batches`` that first hands each raw line to the task's
    ``check_source_line`` (``moe_translation``: an unknown ``<2xx>`` target tag is refused)."""
    check = getattr(task, "check_source_line", None)
    for line in lines if check is not None else ():
        check(line)
    return original(lines, cfg, task, *args, **kwargs)


def _install_in_interactive(name: str):
    def install(wrapper: Callable) -> None:
        for cli in loaded_tool_modules("interactive"):  # only where fairseq-interactive runs
            _wrap(cli, name, wrapper)

    return install


@dataclass(frozen=True)
class Patch:
    """One wrapped fairseq function.

    Attributes:
        target: ``"module:attribute"`` or ``"module:Class.method"``.
        wrapper: ``wrapper(original, *args, **kwargs)``, returns what the original returns.
        why: what fairseq would do wrong without it.
        test: the test (``file::name``) that fails without the wrap.
        install: a custom installer (``install(wrapper)``), where replacing one attribute is
            not enough.
        cli_only: the target is a fairseq_cli script's function, wrapped only where that tool
            runs (its module already loaded).
    """

    target: str
    wrapper: Callable
    why: str
    test: str
    install: Optional[Callable[[Callable], None]] = None
    cli_only: bool = False


PATCHES: List[Patch] = [
    Patch(
        "fairseq.checkpoint_utils:load_checkpoint_to_cpu",
        checkpoint.load_checkpoint_to_cpu,
        "merge the expert shard files of a serving checkpoint, so that --path loads them",
        "tests/test_checkpoint.py::test_shards_merge_into_full_expert_stacks",
    ),
    Patch(
        "fairseq.checkpoint_utils:save_checkpoint",
        training.save_checkpoint,
        "expert parallelism: gather every rank's experts, their optimizer state and fp32 EMA copy on rank 0, "
        "which alone writes the checkpoint",
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_an_uninterrupted_run",
    ),
    Patch(
        "fairseq.trainer:Trainer.state_dict",
        training.trainer_state_dict,
        "put the gathered optimizer state and fp32 EMA copy in rank 0's checkpoint (fairseq saves rank 0's own)",
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_an_uninterrupted_run",
    ),
    Patch(
        "fairseq.trainer:Trainer.train_step",
        training.train_step,
        "a padding (dummy) batch at the end of an update made fairseq zero the sample size of the update's real "
        "batches on that rank: gradients divided by too small a sample size whenever the world size does not divide "
        "the epoch's batch count and --update-freq > 1",
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_an_uninterrupted_run",
    ),
    Patch(
        "fairseq.trainer:Trainer.load_checkpoint",
        training.trainer_load_checkpoint,
        "a checkpoint saved inside an epoch on N ranks resumed on M != N ranks skipped or repeated batches (fairseq "
        "applies the per-rank batch count to the new shards) or failed with 'dataloader mismatch'",
        "tests/test_fairseq_expert_parallel.py::test_resume_inside_an_epoch_on_other_world_sizes_equals_an_uninterrupted_run",
    ),
    Patch(
        "fairseq.checkpoint_utils:load_checkpoint",
        training.load_checkpoint,
        "every expert-parallel rank reads the file; expert optimizer state cut to the rank's share; update count "
        "and LR schedule kept for checkpoints without optimizer state",
        "tests/test_fairseq_expert_parallel.py::test_resume_without_optimizer_state_keeps_the_update_count",
    ),
    Patch(
        "fairseq.models.ema.ema:EMA.build_fp32_params",
        training.ema_build_fp32_params,
        "--ema-fp32 resume: cut the checkpoint's fp32 EMA experts (all E) to the rank's share",
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_an_uninterrupted_run",
    ),
    Patch(
        "fairseq_cli.eval_lm:eval_lm",
        expert_parallel_eval.eval_lm,
        "expert-parallel eval-lm: dummy forwards for fairseq's empty padding batches (every forward is an "
        "all-to-all) and the loss of all ranks' tokens",
        "tests/test_fairseq_expert_parallel.py::test_two_process_expert_parallel_eval_lm_equals_one_process",
        install=expert_parallel_eval.install_eval_lm_wrap,
    ),
    Patch(
        "fairseq.data.data_utils:batch_by_size",
        batch_by_size,
        "the installed fairseq drops the last batch when its size is not a multiple of --required-batch-size-multiple "
        "(default 8): fairseq-generate on 20 sentences printed 16 hypotheses with exit 0, on 3 a ZeroDivisionError",
        "tests/test_reliability.py::test_batch_by_size_keeps_every_sentence",
    ),
    Patch(
        "fairseq.checkpoint_utils:load_model_ensemble_and_task",
        load_model_ensemble_and_task,
        "a --path that does not exist ended in fairseq's IOError traceback",
        "tests/test_reliability.py::test_bad_inputs_give_one_line",
    ),
    Patch(
        "fairseq.tasks.language_modeling:LanguageModelingTask.build_model",
        language_model_build_model,
        "a translation checkpoint given to fairseq-eval-lm ended in AttributeError ... 'supported_targets'",
        "tests/test_reliability.py::test_bad_inputs_give_one_line",
    ),
    Patch(
        "fairseq_cli.interactive:buffered_read",
        buffered_read,
        "one non-UTF-8 input line ended fairseq-interactive in UnicodeDecodeError, losing the valid lines",
        "tests/test_reliability.py::test_interactive_skips_non_utf8_lines_and_refuses_unknown_target_tags",
        install=_install_in_interactive("buffered_read"),
        cli_only=True,
    ),
    Patch(
        "fairseq_cli.interactive:make_batches",
        make_batches,
        "an unknown <2xx> target tag was split into pieces and translated into some language, exit 0",
        "tests/test_reliability.py::test_interactive_skips_non_utf8_lines_and_refuses_unknown_target_tags",
        install=_install_in_interactive("make_batches"),
        cli_only=True,
    ),
]


def _resolve(target: str):
    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def wrap_attribute(target: str, wrapper: Callable) -> None:
    """Replace ``target`` by ``lambda *a, **k: wrapper(original, *a, **k)`` (once)."""
    _wrap(*_resolve(target), wrapper)


def _wrap(owner, name: str, wrapper: Callable) -> None:
    original = getattr(owner, name)
    if getattr(original, "_moe_wrapped", False):
        return

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    wrapped._moe_wrapped = True
    setattr(owner, name, wrapped)


def restore_numpy_compat_long() -> None:
    """numpy 2 removed ``np.compat``; fairseq's ``TokenBlockDataset`` (``--sample-break-mode eos``)
    and ``LanguagePairDataset.get_batch_shapes`` still read ``np.compat.long`` and crashed with
    ``module 'numpy' has no attribute 'compat'`` (fairseq-eval-lm, fairseq-interactive with an LM).
    Puts back that one name (``int``, as numpy 1 defined it) where numpy lacks it.
    Test: ``tests/test_fairseq_cli.py::test_eval_lm_eos_break_mode_and_interactive_lm``."""
    if not hasattr(np, "compat"):
        import types

        np.compat = types.SimpleNamespace(long=int)


def install_all() -> None:
    """Install every entry of :data:`PATCHES` (idempotent), and :func:`restore_numpy_compat_long`."""
    restore_numpy_compat_long()
    for patch in PATCHES:
        if patch.install is not None:
            patch.install(patch.wrapper)
        else:
            wrap_attribute(patch.target, patch.wrapper)


install = install_all  # the name the reliability tests use
