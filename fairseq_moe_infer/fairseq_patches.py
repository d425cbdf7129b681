"""The plugin's wraps of installed fairseq functions, each named with the reason.

Importing the plugin calls :func:`install` once. Each wrap is a few lines, idempotent
(marked ``_moe_patched``), keeps fairseq's signature and behaviour otherwise, and has a test
that fails on the unwrapped fairseq (named below).

* ``fairseq.data.data_utils.batch_by_size`` -- the installed fairseq (ve-fairseq 0.12.3)
  drops the last batch when its size is not a multiple of ``--required-batch-size-multiple``
  (default 8): ``fairseq-generate`` on 20 sentences printed 16 hypotheses with exit status 0,
  on 3 sentences it ended in ``ZeroDivisionError``; eval-lm and interactive lost sentences
  alike. The wrap hands the dropped sentences over as one more (smaller) batch.
  Test: ``tests/test_reliability.py::test_batch_by_size_keeps_every_sentence``.
* ``fairseq.checkpoint_utils.load_model_ensemble_and_task`` -- a ``--path`` that does not
  exist ended in fairseq's ``IOError`` traceback; in the fairseq tools it is now one line.
  Test: ``tests/test_reliability.py::test_bad_checkpoint_paths_give_one_line``.

* ``fairseq_cli.interactive.buffered_read`` -- fairseq-interactive decoded its input as UTF-8 in
  one stream: one non-UTF-8 line ended the whole run in ``UnicodeDecodeError``. The wrap reads
  bytes, reports each bad line (number and byte offset) and skips it; valid lines are translated.
  Test: ``tests/test_fairseq_cli.py::test_interactive_bad_input_lines``.
* ``fairseq_cli.interactive.make_batches`` -- hands each raw input line to the task's
  ``check_source_line`` first (``moe_translation``: unknown target tag ``<2es>`` is refused with the
  known ones; before, it was split into pieces and translated into some language, exit 0).
  Test: ``tests/test_fairseq_cli.py::test_interactive_bad_input_lines``.

* ``fairseq.tasks.language_modeling.LanguageModelingTask.build_model`` -- a translation checkpoint
  given to fairseq-eval-lm ended in ``AttributeError: ... no attribute 'supported_targets'``; now
  one line saying what the model is and which tool scores it.
  Test: ``tests/test_fairseq_cli.py::test_bad_inputs_give_one_line``.

Other wraps of fairseq live beside the code they serve: ``checkpoint_utils.load_checkpoint_to_cpu``
(:func:`fairseq_moe_infer.checkpoint.install_shard_loader`: expert shards, unreadable files),
the checkpoint save/load hooks of :mod:`fairseq_moe_infer.training` and the eval-lm hook of
:mod:`fairseq_moe_infer.expert_parallel_eval`.
"""

import logging
import os
import sys

import numpy as np
from fairseq import checkpoint_utils
from fairseq.data import data_utils

from .cli import exit_with_error, in_fairseq_tool

logger = logging.getLogger("fairseq_moe_infer")


def _mark(wrapper, original):
    wrapper._moe_patched = True
    wrapper.__wrapped__ = original
    wrapper.__doc__ = original.__doc__
    return wrapper


def patch_batch_by_size() -> None:
    """Wrap ``data_utils.batch_by_size`` so that no sentence is dropped (see the module docstring)."""
    original = data_utils.batch_by_size
    if getattr(original, "_moe_patched", False):
        return

    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                           required_batch_size_multiple, fixed_shapes)
        if fixed_shapes is None:  # batches cover a prefix of ``indices`` in order; fairseq dropped the rest
            covered = sum(len(b) for b in batches)
            if covered < len(indices):
                batches = list(batches) + [indices[covered:]]
        return batches

    data_utils.batch_by_size = _mark(batch_by_size, original)


def patch_model_file_check() -> None:
    """Wrap ``checkpoint_utils.load_model_ensemble_and_task``: a missing ``--path`` file is one line
    in the fairseq tools (fairseq raised ``IOError`` with a traceback)."""
    original = checkpoint_utils.load_model_ensemble_and_task
    if getattr(original, "_moe_patched", False):
        return

    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        if in_fairseq_tool() and not kwargs.get("suffix") and kwargs.get("num_shards", 1) == 1:
            missing = [f for f in filenames if not os.path.exists(f)]
            if missing:
                exit_with_error(f"checkpoint {missing[0]} does not exist (check --path)")
        return original(filenames, *args, **kwargs)

    checkpoint_utils.load_model_ensemble_and_task = _mark(load_model_ensemble_and_task, original)


def _interactive_modules():
    """fairseq_cli.interactive, and its second copy when run as ``python -m fairseq_cli.interactive``."""
    found = [sys.modules.get("fairseq_cli.interactive")]
    main = sys.modules.get("__main__")
    if (getattr(main, "__file__", "") or "").endswith(os.path.join("fairseq_cli", "interactive.py")):
        found.append(main)
    return [m for m in found if m is not None and hasattr(m, "buffered_read")]


def patch_interactive() -> None:
    """Wrap fairseq-interactive's ``buffered_read`` and ``make_batches`` (see the module docstring);
    a no-op unless fairseq-interactive is the running tool."""
    for cli in _interactive_modules():
        if not getattr(cli.buffered_read, "_moe_patched", False):
            cli.buffered_read = _mark(_buffered_read, cli.buffered_read)
        if not getattr(cli.make_batches, "_moe_patched", False):
            cli.make_batches = _mark(_checked_make_batches(cli.make_batches), cli.make_batches)


def _buffered_read(input, buffer_size):
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


def _checked_make_batches(original):
    def make_batches(lines, cfg, task, *args, **kwargs):
        check = getattr(task, "check_source_line", None)
        for line in lines if check is not None else ():
            check(line)
        return original(lines, cfg, task, *args, **kwargs)

    return make_batches


def patch_language_model_check() -> None:
    """Wrap ``LanguageModelingTask.build_model`` (stock and ``moe_language_modeling`` task): refuse a
    model that is not a language model with one line."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY, FairseqLanguageModel
    from fairseq.tasks.language_modeling import LanguageModelingTask

    original = LanguageModelingTask.build_model
    if getattr(original, "_moe_patched", False):
        return

    def build_model(self, cfg, from_checkpoint=False):
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

    LanguageModelingTask.build_model = _mark(build_model, original)


def install() -> None:
    """Apply every wrap of this module (idempotent)."""
    patch_batch_by_size()
    patch_model_file_check()
    patch_interactive()
    patch_language_model_check()
