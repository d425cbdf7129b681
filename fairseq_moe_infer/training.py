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
* **checkpoints** -- fairseq writes on rank 0 only; before each save the ranks
  gather their experts on rank 0 so the checkpoint holds all E of them (any world
  size, one process included, can load it). The optimizer state is rank 0's only,
  so expert-parallel checkpoints are written without it (see
  :func:`install_checkpoint_save_hook`); on resume (:func:`install_checkpoint_load_hook`)
  every rank reads the file itself, the update count and learning-rate schedule
  continue, and the optimizer moments start fresh, with a warning;
* **equal batch counts** -- fairseq pads every rank's shard with dummy batches,
  which run the forward pass (and its all-to-alls) with zero loss weight.

Raises (as one-line ``SystemExit`` from the task): ``--fp16`` with flattened
fp32 gradients (the expert marker is lost: pass ``--fp16-no-flatten-grads``),
or a fully-sharded / SlowMo data-parallel backend.
"""

import logging

from torch import nn

from .cli import exit_with_error
from .moe import moe_layers

logger = logging.getLogger(__name__)

_ignore_attr = "_ddp_params_and_buffers_to_ignore"


def expert_parallel_world(model: nn.Module) -> int:
    """Number of ranks the experts of ``model`` are sharded over (1 if none or no MoE layer)."""
    for m in moe_layers(model):
        if m.group is not None:
            import torch.distributed as dist

            return dist.get_world_size(m.group)
    return 1


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
    names = []
    for n, p in model.named_parameters():
        if getattr(p, "expert", False):
            names.append(n)
            p.register_hook(lambda g, w=world: g / w)
    setattr(model, _ignore_attr, list(getattr(model, _ignore_attr, [])) + names)
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


def check_expert_grads_finite(model: nn.Module, optimizer) -> None:
    """Before the optimizer step of an expert-parallel run: stop every rank alike if any rank's
    expert gradients overflowed.

    fairseq detects fp16 overflow through the gradient norm, which leaves expert parameters
    out (each rank holds other experts); an inf in one rank's expert gradients would otherwise
    step those experts to inf. All ranks agree by an all-reduce; then, as fairseq does for an
    overflow, the fp16 loss scaler lowers the scale and raises ``OverflowError`` (the update
    is skipped), or without a scaler ``FloatingPointError`` is raised.
    """
    if expert_parallel_world(model) == 1:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if getattr(p, "expert", False) and p.grad is not None]
    device = grads[0].device if grads else next(model.parameters()).device
    flag = torch.zeros(1, device=device)
    for g in grads:
        flag += (~torch.isfinite(g)).any()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag)
    if flag.item() > 0:
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            scaler.check_overflow(float("inf"))  # lowers the loss scale and raises OverflowError
        raise FloatingPointError("expert gradients are not finite on some expert-parallel rank")


def install_checkpoint_save_hook() -> None:
    """Wrap ``fairseq.checkpoint_utils.save_checkpoint`` (called by every rank of
    ``fairseq-train``) so that expert-parallel runs save all experts.

    Every rank sends its experts to rank 0 (into CPU memory), rank 0 writes the checkpoint with the
    full [E, ...] stacks, then the copies are dropped. With N > 1 the optimizer
    state is not saved (it would hold rank 0's experts only); a warning says so.
    """
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.save_checkpoint, "_moe_wrapped", False):
        return
    original = checkpoint_utils.save_checkpoint

    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        models = [trainer.model]
        if getattr(trainer, "ema", None) is not None:  # --store-ema: its copy is saved too
            models.append(trainer.ema.get_model())
        layers = [m for model in models for m in moe_layers(model) if m.group is not None]
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


def install_checkpoint_load_hook() -> None:
    """Wrap ``fairseq.checkpoint_utils.load_checkpoint`` (called by every rank of
    ``fairseq-train`` to resume) for expert-parallel runs.

    Every rank reads the checkpoint file itself (``--load-checkpoint-on-all-dp-ranks``):
    fairseq would otherwise broadcast rank 0's copy, which torch's weights-only load
    refuses on the other ranks. A checkpoint saved without optimizer state (as
    expert-parallel ones are) makes fairseq restart the update count and the
    learning-rate schedule at 0; they are restored from its optimizer history unless
    ``--reset-optimizer`` / ``--reset-lr-scheduler`` ask otherwise.
    """
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils.load_checkpoint, "_moe_wrapped", False):
        return
    original = checkpoint_utils.load_checkpoint

    def load_checkpoint(cfg, trainer, **kwargs):
        model = getattr(trainer, "_model", None) or trainer.model
        if expert_parallel_world(model) == 1:
            return original(cfg, trainer, **kwargs)
        cfg.load_checkpoint_on_all_dp_ranks = True
        out = original(cfg, trainer, **kwargs)
        history = getattr(trainer, "_optim_history", None) or []
        last = history[-1] if history else {}
        if not cfg.reset_optimizer and trainer.get_num_updates() == 0 and last.get("num_updates", 0) > 0:
            if not cfg.reset_lr_scheduler and "lr_scheduler_state" in last:
                trainer.lr_scheduler.load_state_dict(last["lr_scheduler_state"])
            trainer.set_num_updates(last["num_updates"])
            logger.warning(
                f"resumed expert-parallel training at update {last['num_updates']}: update count and "
                "learning-rate schedule restored, optimizer moments start fresh (not saved for expert-parallel runs)"
            )
        return out

    load_checkpoint._moe_wrapped = True
    checkpoint_utils.load_checkpoint = load_checkpoint
