"""Every fairseq function this plugin wraps, in one list, with why (installed on import).

Each entry names the fairseq function, says why it is wrapped and which test fails without
the wrap; the wrapper itself is a small function ``wrapper(original, *args, **kwargs)`` kept
beside the code it serves. :func:`install_all` installs every entry once (idempotent: a wrapped
function carries ``_moe_wrapped``). Nothing else in the plugin replaces a fairseq function.
"""

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional

from . import checkpoint, expert_parallel_eval, training


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
    """

    target: str
    wrapper: Callable
    why: str
    test: str
    install: Optional[Callable[[Callable], None]] = None


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
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_a_one_process_resume",
    ),
    Patch(
        "fairseq.trainer:Trainer.state_dict",
        training.trainer_state_dict,
        "put the gathered optimizer state and fp32 EMA copy in rank 0's checkpoint (fairseq saves rank 0's own)",
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_a_one_process_resume",
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
        "tests/test_fairseq_expert_parallel.py::test_resume_on_other_world_sizes_equals_a_one_process_resume",
    ),
    Patch(
        "fairseq_cli.eval_lm:eval_lm",
        expert_parallel_eval.eval_lm,
        "expert-parallel eval-lm: dummy forwards for fairseq's empty padding batches (every forward is an "
        "all-to-all) and the loss of all ranks' tokens",
        "tests/test_fairseq_expert_parallel.py::test_two_process_expert_parallel_eval_lm_equals_one_process",
        install=expert_parallel_eval.install_eval_lm_wrap,
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
    owner, name = _resolve(target)
    original = getattr(owner, name)
    if getattr(original, "_moe_wrapped", False):
        return

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    wrapped._moe_wrapped = True
    setattr(owner, name, wrapped)


def install_all() -> None:
    """Install every entry of :data:`PATCHES` (idempotent)."""
    for patch in PATCHES:
        if patch.install is not None:
            patch.install(patch.wrapper)
        else:
            wrap_attribute(patch.target, patch.wrapper)
