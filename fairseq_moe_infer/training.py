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
  gather on rank 0 their experts, the optimizer state of their experts (Adam moments,
  SGD momentum) and, with ``--store-ema --ema-fp32``, the fp32 EMA copy of their experts,
  so the checkpoint holds all E experts everywhere and resumes on any world size (one
  process included): on load every rank takes its share of each of them
  (:func:`save_checkpoint`, :func:`load_checkpoint`, :func:`trainer_state_dict`,
  :func:`ema_build_fp32_params`, installed by :mod:`fairseq_moe_infer.fairseq_patches`).
  A checkpoint without optimizer state (``--no-save-optimizer-state``, or written by an
  earlier version) still continues the update count and learning-rate schedule of its
  optimizer history, with a warning that the moments start fresh;
* **equal batch counts** -- fairseq pads every rank's shard with dummy batches,
  which run the forward pass (and its all-to-alls) with zero loss weight; a dummy batch at the
  end of an update no longer makes fairseq drop the sample size of that update's real batches
  (:func:`train_step`).

Raises (as one-line ``SystemExit`` from the task): ``--fp16`` with flattened
fp32 gradients (the expert marker is lost: pass ``--fp16-no-flatten-grads``),
or a fully-sharded / SlowMo data-parallel backend.
"""

import logging
from itertools import chain
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .cli import exit_with_error
from .moe import EXPERT_PARAMS, Experts, gather_expert_stack, is_expert_param, moe_layers

logger = logging.getLogger(__name__)

_ignore_attr = "_ddp_params_and_buffers_to_ignore"
SAVED_WORLD_SIZE_KEY = "moe_data_parallel_world_size"  # extra_state: the world size a checkpoint was saved on


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
        if is_expert_param(p):
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
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if is_expert_param(p) and p.grad is not None]
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


def _expert_owners(model: nn.Module, by: str) -> Dict:
    """Map each expert tensor of ``model`` to ``(Experts module, expert-parallel group)``:
    keyed by ``id(parameter)`` (``by="param"``) or by state-dict key (``by="key"``)."""
    out = {}
    for name, m in moe_layers(model, named=True):
        for p in EXPERT_PARAMS:
            out[id(getattr(m.experts, p)) if by == "param" else f"{name}.experts.{p}"] = (m.experts, m.group)
    return out


def _optimizer_params(trainer) -> list:
    """The parameters in the order fairseq's trainer hands them to the optimizer
    (``Trainer._build_optimizer``): index i of the optimizer's state dict is the i-th."""
    return [p for p in chain(trainer.model.parameters(), trainer.criterion.parameters()) if p.requires_grad]


def _is_stack_of(v, p) -> bool:
    return torch.is_tensor(v) and v.dim() >= 1 and v.shape[1:] == p.shape[1:]


def gather_optimizer_state(trainer) -> Optional[dict]:
    """fairseq's optimizer state dict with the state of every expert parameter gathered over the
    expert-parallel ranks (a collective: every rank calls it).

    Per expert parameter, every state tensor shaped like the parameter ([E_local, ...]: Adam's
    ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``) becomes the [E, ...] stack of all
    ranks (rank r's rows ``[r * E_local, (r + 1) * E_local)``); scalars (``step``) are rank 0's.
    A rank without state for a parameter yet (no gradient reached it) contributes zeros.

    Returns:
        rank 0: the state dict (CPU copies of the gathered tensors, the rest shared with the live
        optimizer); other ranks: None.
    """
    import torch.distributed as dist

    owners = _expert_owners(trainer.model, by="param")
    params = _optimizer_params(trainer)
    slots = [(i, p, owners[id(p)][1]) for i, p in enumerate(params) if id(p) in owners]
    full = trainer.optimizer.state_dict()
    state = full["state"]
    # agree on which state entries exist (a rank may have none yet for some parameter):
    # stacks by dtype, scalars by value
    mine = {
        i: {k: ("stack", v.dtype) if _is_stack_of(v, p) else ("value", v) for k, v in state.get(i, {}).items()}
        for i, p, _ in slots
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    new_state = dict(state)
    for i, p, group in slots:
        entries: Dict[str, Tuple] = {}
        for desc in everyone:
            for k, d in desc.get(i, {}).items():
                entries.setdefault(k, d)
        if not entries:
            continue
        entry = dict(state.get(i, {}))
        for k in sorted(entries):
            kind, what = entries[k]
            if kind == "value":
                entry.setdefault(k, what)
                continue
            local = entry.get(k)
            local = torch.zeros(p.shape, dtype=what, device=p.device) if local is None else local.to(p.device)
            entry[k] = gather_expert_stack(local, group)
        new_state[i] = entry
    return dict(full, state=new_state) if dist.get_rank() == 0 else None


def slice_optimizer_state(trainer) -> None:
    """After fairseq loaded an optimizer state holding all E experts (any checkpoint written by
    this plugin, or by one process), keep this rank's share of every expert state tensor.
    No-op where the state already matches (one process, or nothing loaded).

    Raises:
        MoEConfigError: a state tensor whose expert count matches neither E nor E_local.
    """
    if getattr(trainer, "_optimizer", None) is None:
        return
    torch_opt = trainer.optimizer.optimizer
    flat = [p for g in torch_opt.param_groups for p in g["params"]]
    params = _optimizer_params(trainer)
    if len(flat) != len(params):  # an optimizer fairseq built differently: nothing known to slice
        return
    owners = _expert_owners(trainer.model, by="param")
    for i, p in enumerate(params):
        if id(p) not in owners or flat[i] not in torch_opt.state:
            continue
        experts: Experts = owners[id(p)][0]
        st = torch_opt.state[flat[i]]
        for k, v in list(st.items()):
            if _is_stack_of(v, p) and v.shape[0] != p.shape[0]:
                st[k] = experts.local_share(f"optimizer state {k} of an expert parameter", v).clone()


def gather_ema_fp32(trainer) -> Optional[dict]:
    """The fp32 EMA copy (``--store-ema --ema-fp32``) with its expert tensors gathered over the
    expert-parallel ranks (a collective). Returns rank 0's complete dict; None elsewhere or
    without an fp32 EMA copy."""
    import torch.distributed as dist

    ema = getattr(trainer, "ema", None)
    fp32 = getattr(ema, "fp32_params", None)
    if not fp32:
        return None
    owners = _expert_owners(ema.get_model(), by="key")
    full = dict(fp32)
    for key in sorted(k for k in fp32 if k in owners):  # the same order on every rank
        full[key] = gather_expert_stack(fp32[key], owners[key][1])
    return full if dist.get_rank() == 0 else None


def local_expert_share(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose expert stacks of all E experts are cut to ``model``'s share
    (:meth:`Experts.local_share`); other entries are kept as they are."""
    out = dict(state_dict)
    for key, (experts, _) in _expert_owners(model, by="key").items():
        if key in out:
            out[key] = experts.local_share(key, out[key])
    return out


# ---- the wraps of fairseq functions (installed by fairseq_moe_infer.fairseq_patches) --------------


def _is_padding_batch(sample) -> bool:
    """fairseq's test for the empty batch it pads a rank's share of an epoch with
    (``Trainer._prepare_sample`` turns it into a dummy forward)."""
    return sample is None or len(sample) == 0


def weightless_dummy_batch(sample_size, logging_output: dict) -> Tuple[int, dict]:
    """The sample size (0) and logging output (every number zeroed) a dummy batch contributes.

    A dummy batch (fairseq's ``ignore_grad`` forward on a rank whose share of the epoch ran out)
    already has its loss multiplied by 0; fairseq would still add its sample size and log its loss
    unless it is the last batch of the update. The ``moe_*`` tasks return these instead, so a dummy
    weighs nothing wherever it sits in an update (needed by :func:`train_step`)."""
    zeroed = {k: v * 0 if torch.is_tensor(v) or (isinstance(v, (int, float)) and not isinstance(v, bool)) else v
              for k, v in logging_output.items()}
    return 0, zeroed


def train_step(original, trainer, samples, raise_oom=False):
    """Wraps ``fairseq.trainer.Trainer.train_step`` (one update over ``--update-freq`` batches).

    fairseq pads a rank's share of an epoch with empty batches so that all ranks make the same
    number of forwards (every MoE forward is an all-to-all). When such a padding batch ends an update
    that also holds real batches (world size not dividing the epoch's batch count, ``--update-freq``
    > 1), fairseq's ``train_step`` takes the whole update for a dummy: it zeroes the rank's summed
    sample size and drops its logging outputs, so every rank divides the gradients of the real batches
    by too small a sample size (seen: a 1->2-rank resume diverged from a one-process resume). Under a
    ``moe_*`` task (dummies weigh nothing there: :func:`weightless_dummy_batch`) the padding batches
    are moved to the front of the update; then the last batch is real and fairseq sums the real
    batches' sample sizes and logs them. An update of padding batches only is left as fairseq runs it.
    """
    if getattr(trainer.task, "weightless_dummy_batches", False):
        padding = [s for s in samples if _is_padding_batch(s)]
        if padding and len(padding) < len(samples):
            samples = padding + [s for s in samples if not _is_padding_batch(s)]
    return original(trainer, samples, raise_oom)


def save_checkpoint(original, cfg, trainer, epoch_itr, val_loss):
    """Wraps ``fairseq.checkpoint_utils.save_checkpoint`` (called by every rank of
    ``fairseq-train``; only rank 0 writes): under expert parallelism the ranks first gather their
    experts (model and EMA model), their experts' optimizer state and fp32 EMA copy on rank 0,
    where :func:`trainer_state_dict` puts them in the checkpoint."""
    models = [trainer.model]
    if getattr(trainer, "ema", None) is not None:  # --store-ema: its copy is saved too
        models.append(trainer.ema.get_model())
    layers = [m for model in models for m in moe_layers(model) if m.group is not None]
    if not layers or cfg.no_save:
        return original(cfg, trainer, epoch_itr, val_loss)
    for m in layers:
        m.experts.gather_for_save(m.group)
    trainer._moe_gathered = {
        "optimizer": None if cfg.no_save_optimizer_state else gather_optimizer_state(trainer),
        "ema_fp32": gather_ema_fp32(trainer),
    }
    try:
        return original(cfg, trainer, epoch_itr, val_loss)
    finally:
        trainer._moe_gathered = None
        for m in layers:
            m.experts.release_gathered()


def trainer_state_dict(original, trainer) -> dict:
    """Wraps ``fairseq.trainer.Trainer.state_dict`` (rank 0 builds the checkpoint with it): puts
    in the optimizer state and fp32 EMA copy gathered by :func:`save_checkpoint`; fairseq would
    save rank 0's own (its experts only, wrong for every other rank). Also records the data-parallel
    world size in ``extra_state`` (for :func:`trainer_load_checkpoint`)."""
    out = original(trainer)
    if moe_layers(trainer.model) and isinstance(out.get("extra_state"), dict):
        out["extra_state"][SAVED_WORLD_SIZE_KEY] = trainer.data_parallel_world_size  # read by trainer_load_checkpoint
    gathered = getattr(trainer, "_moe_gathered", None) or {}
    if gathered.get("optimizer") is not None and "last_optimizer_state" in out:
        out["last_optimizer_state"] = gathered["optimizer"]
    if gathered.get("ema_fp32") is not None and "ema_fp32_params" in out.get("extra_state", {}):
        out["extra_state"]["ema_fp32_params"] = gathered["ema_fp32"]
    return out


def trainer_load_checkpoint(original, trainer, filename, *args, **kwargs):
    """Wraps ``fairseq.trainer.Trainer.load_checkpoint`` (returns the checkpoint's ``extra_state``, whose
    ``train_iterator`` then positions the epoch iterator): a checkpoint saved inside an epoch on N ranks
    stores ``iterations_in_epoch`` = n batches per rank, i.e. the epoch's first n * N batches (rank r had
    batches r, r + N, ...). fairseq applies n to each rank's shard on any world size M, so M != N skipped
    (M > N) or repeated (M < N) batches silently, or failed with 'dataloader mismatch'. Here each of the M
    ranks skips n * N / M batches, which is again exactly the first n * N of the epoch (logged); when M
    does not divide n * N the run stops with one line. Checkpoints without the saved world size
    (:func:`trainer_state_dict` records it) are left as fairseq reads them."""
    extra_state = original(trainer, filename, *args, **kwargs)
    itr = (extra_state or {}).get("train_iterator") or {}
    saved, n = (extra_state or {}).get(SAVED_WORLD_SIZE_KEY), itr.get("iterations_in_epoch", 0)
    world = trainer.data_parallel_world_size
    if not n or not saved or saved == world or trainer.cfg.checkpoint.reset_dataloader:
        return extra_state
    done = n * saved
    if done % world:
        exit_with_error(
            f"{filename} was saved inside epoch {itr.get('epoch')} after {done} batches ({n} on each of {saved} ranks); "
            f"{world} ranks cannot resume exactly there: resume on a world size dividing {done}, or pass "
            "--reset-dataloader to restart the epoch")
    itr["iterations_in_epoch"] = done // world
    logger.info(f"resuming inside epoch {itr.get('epoch')} on {world} ranks (saved on {saved}): each rank skips "
                f"{done // world} batches, the {done} batches of the epoch done before")
    return extra_state


def ema_build_fp32_params(original, ema, state_dict=None):
    """Wraps ``fairseq.models.ema.EMA.build_fp32_params`` (fairseq's trainer calls it with the
    checkpoint's ``ema_fp32_params`` on resume): an expert stack of all E experts is cut to this
    rank's share first; fairseq would copy it whole into the rank's [E_local, ...] tensor
    (a shape error) or, saved per rank, give every rank rank 0's experts."""
    if state_dict is not None:
        state_dict = local_expert_share(ema.get_model(), state_dict)
    return original(ema, state_dict)


def load_checkpoint(original, cfg, trainer, **kwargs):
    """Wraps ``fairseq.checkpoint_utils.load_checkpoint`` (every rank of ``fairseq-train`` calls
    it to resume) for models with MoE layers, any world size:

    * under expert parallelism every rank reads the file itself
      (``--load-checkpoint-on-all-dp-ranks``, logged when set here): fairseq would otherwise
      broadcast rank 0's copy, which torch's weights-only load refuses on the other ranks;
    * the optimizer state of expert parameters, saved for all E experts, is cut to this rank's
      share (:func:`slice_optimizer_state`);
    * a checkpoint without optimizer state makes fairseq restart the update count and the
      learning-rate schedule at 0; they are restored from its optimizer history unless
      ``--reset-optimizer`` / ``--reset-lr-scheduler`` ask otherwise (a warning says the
      moments start fresh).
    """
    model = getattr(trainer, "_model", None) or trainer.model
    if not moe_layers(model):
        return original(cfg, trainer, **kwargs)
    if expert_parallel_world(model) > 1 and not cfg.load_checkpoint_on_all_dp_ranks:
        logger.info(
            "expert parallelism: setting --load-checkpoint-on-all-dp-ranks (every rank reads the checkpoint; "
            "fairseq's broadcast of rank 0's copy is refused by torch's weights-only load)"
        )
        cfg.load_checkpoint_on_all_dp_ranks = True
    out = original(cfg, trainer, **kwargs)
    slice_optimizer_state(trainer)
    history = getattr(trainer, "_optim_history", None) or []
    last = history[-1] if history else {}
    if not cfg.reset_optimizer and trainer.get_num_updates() == 0 and last.get("num_updates", 0) > 0:
        if not cfg.reset_lr_scheduler and "lr_scheduler_state" in last:
            trainer.lr_scheduler.load_state_dict(last["lr_scheduler_state"])
        trainer.set_num_updates(last["num_updates"])
        logger.warning(
            f"resumed training at update {last['num_updates']} from a checkpoint without optimizer state: "
            "update count and learning-rate schedule restored, optimizer moments start fresh"
        )
    return out
