"""Expert-parallel training under fairseq's own launcher (``fairseq-train --distributed-world-size N``).

fairseq's MoE branch shards experts over the data-parallel workers: each rank
holds ``E / N`` experts, the shared (non-expert) parameters are replicated and
averaged as usual. fairseq 0.12 already leaves parameters marked ``expert``
out of the legacy all-reduce (``--ddp-backend legacy_ddp``) and out of the
gradient norm; this module supplies the rest:

* **gradient scale** -- data-parallel training averages shared gradients over
  the N ranks, and fairseq then multiplies every gradient by N / sample_size.
  An expert's gradient already sums the contributions of all ranks' tokens
  (they reached it by all-to-all), so it is divided by N once more;
* **torch DDP** (``--ddp-backend pytorch_ddp``, fairseq's default) is told to
  ignore expert parameters: neither broadcast at start nor all-reduced;
* **checkpoints** -- fairseq writes on rank 0 only; before each save every rank
  all-gathers the experts so the checkpoint holds all E of them (any world size,
  one process included, can load it). The optimizer state is rank 0's only, so
  expert-parallel checkpoints are written without it (see
  :func:`install_checkpoint_save_hook`); resuming starts a fresh optimizer and
  says so;
* **equal batch counts** -- fairseq pads every rank's shard with dummy batches,
  which run the forward pass (and its all-to-alls) with zero loss weight.

Raises (as one-line ``SystemExit`` from the task): ``--fp16`` with flattened
fp32 gradients (the expert marker is lost: pass ``--fp16-no-flatten-grads``),
or a fully-sharded / SlowMo data-parallel backend.
"""

import logging
from typing import List

from torch import nn

from .cli import exit_with_error
from .moe import MoELayer

logger = logging.getLogger(__name__)

_ignore_attr = "_ddp_params_and_buffers_to_ignore"


def expert_parallel_world(model: nn.Module) -> int:
    """Number of ranks the experts of ``model`` are sharded over (1 if none or no MoE layer)."""
    for m in model.modules():
        if isinstance(m, MoELayer) and m.group is not None:
            import torch.distributed as dist

            return dist.get_world_size(m.group)
    return 1


def expert_parameter_names(model: nn.Module) -> List[str]:
    """Names (as in ``model.named_parameters()``) of all parameters marked ``expert``."""
    return [n for n, p in model.named_parameters() if getattr(p, "expert", False)]


def prepare_expert_parallel_training(model: nn.Module) -> int:
    """Make ``model`` ready for data-parallel training with sharded experts.

    Divides expert gradients by the world size N (see the module docstring) and
    lists the expert parameters for torch DDP to ignore. Idempotent.

    Returns:
        N (1: nothing was changed).
    """
    world = expert_parallel_world(model)
    if world == 1 or getattr(model, "_moe_expert_parallel_prepared", False):
        return world
    names = expert_parameter_names(model)
    setattr(model, _ignore_attr, list(getattr(model, _ignore_attr, [])) + names)
    for n, p in model.named_parameters():
        if n in names:
            p.register_hook(lambda g, w=world: g / w)
    model._moe_expert_parallel_prepared = True
    logger.info(f"expert parallelism over {world} ranks: {len(names)} expert tensors sharded, excluded from DDP")
    return world


def check_training_setup(model: nn.Module, optimizer) -> None:
    """Exit with one line where fairseq's training setup would mix the experts of different ranks.

    Args:
        model: the (possibly data-parallel wrapped) model fairseq trains.
        optimizer: fairseq's optimizer wrapper.
    """
    if expert_parallel_world(model) == 1:
        return
    problem = None
    if isinstance(getattr(optimizer, "fp32_params", None), dict):
        problem = (
            "expert parallelism with --fp16 needs --fp16-no-flatten-grads (or --memory-efficient-fp16): "
            "flattened fp32 gradients lose the expert marker and would mix the ranks' experts"
        )
    wrapper = type(getattr(model, "module", model)).__name__ + type(model).__name__
    if "FullySharded" in wrapper or "SlowMo" in wrapper:
        problem = f"expert parallelism needs --ddp-backend pytorch_ddp or legacy_ddp, not {wrapper}"
    if problem:
        exit_with_error(problem)


def install_checkpoint_save_hook() -> None:
    """Wrap ``fairseq.checkpoint_utils.save_checkpoint`` (called by every rank of
    ``fairseq-train``) so that expert-parallel runs save all experts.

    Every rank all-gathers its experts, rank 0 writes the checkpoint with the
    full [E, ...] stacks, then the copies are dropped. With N > 1 the optimizer
    state is not saved (it would hold rank 0's experts only); a warning says so.
    """
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.save_checkpoint, "_moe_wrapped", False):
        return
    original = checkpoint_utils.save_checkpoint

    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        model = trainer.model
        layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.group is not None]
        if not layers or cfg.no_save:
            return original(cfg, trainer, epoch_itr, val_loss)
        if not cfg.no_save_optimizer_state:
            logger.warning(
                "expert-parallel checkpoint: optimizer state not saved (it holds rank 0's experts only); "
                "a resumed run starts a fresh optimizer"
            )
            cfg.no_save_optimizer_state = True
        for m in layers:
            m.experts.gather_for_save(m.group)
        try:
            return original(cfg, trainer, epoch_itr, val_loss)
        finally:
            for m in layers:
                m.experts.release_gathered()

    save_checkpoint._moe_wrapped = True
    checkpoint_utils.save_checkpoint = save_checkpoint
