"""Expert-parallel ``fairseq-generate`` / ``fairseq-interactive`` and beam search in validation.

With experts sharded over N ranks every MoE-layer forward is a collective (all-to-all),
so all ranks must run the same MoE layers in the same order. Beam search breaks that:
each rank's batch ends after its own number of decoder steps. :class:`MoELockstep`
keeps the ranks in step:

* inside a lockstep (every ``task.inference_step`` of a ``moe_*`` task, see
  :class:`~fairseq_moe_infer.tasks.moe_task.MoETaskMixin`) each MoE layer, before its
  collectives, all-reduces (MAX) a small int64 vector ``[i, -i, 1]`` naming it (i = its
  1-based position among the models' MoE layers);
* a rank that has finished (its beam search, or its whole share of the data) calls
  :meth:`MoELockstep.serve`: it all-reduces ``[0, -BIG, busy]`` in a loop, and while some
  rank names a layer it runs that layer with zero tokens, which takes part in the
  layer's collectives (its experts compute the other ranks' tokens) and changes nothing
  on this rank: no output, its MoE counters are put back, and a zero-token batch does not
  raise the static capacity, which is ``ceil(fraction * max over ranks of T)``;
* it leaves when no rank names a layer (end of a batch: every rank is between batches),
  or, with ``final=True`` (no more data here), when no rank is busy either.

The all-reduce also checks that the working ranks name the same layer (else
``RuntimeError``). Batches therefore start together on all ranks, and within a batch the
working ranks are at the same decoder step.

``fairseq-generate --distributed-world-size N`` (fairseq's launcher, ``--distributed-no-spawn``
or torchrun): fairseq's generate has no distributed mode; :func:`install_generate_hook` wraps
``fairseq_cli.generate.main`` so that for ``moe_*`` tasks it starts through
``fairseq.distributed.utils.call_main`` (as eval-lm and interactive do). Rank r translates
fairseq's batches r, r + N, ... (fairseq's own sharding), its printed lines are recorded, and
rank 0 prints all ranks' S-/T-/H-/D-/P-/... lines in the order of one process (batch b of the
unsharded iterator is batch b // N of rank b % N) and the ``Generate ... BLEU`` line of the
whole set (the ranks' scorer inputs replayed into one scorer).

``fairseq-interactive`` (already distributed through ``call_main``): rank 0 reads the input
and broadcasts each buffer, every rank decodes the same sentences, only rank 0 prints.
"""

import contextlib
import logging
import multiprocessing
import os
import re
import sys
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .bounded_waits import end_expert_parallel_run
from .cli import exit_with_error, loaded_tool_modules
from .moe import moe_layers
from .training import expert_parallel_world

logger = logging.getLogger("fairseq_moe_infer")

_BIG = 1 << 40
_ID_LINE = re.compile(r"^[A-Z]-(\d+)(?:_\d+)?\t")


class MoELockstep:
    """Keeps expert-parallel ranks in the same MoE layer while they run different step counts.

    Args:
        models: the models whose MoE layers run inside the lockstep (every rank must pass
            the same architectures in the same order).

    See the module docstring for the protocol. Use as a context manager around work whose
    step count may differ between ranks (a beam search): on entry each MoE layer gets a
    forward pre-hook announcing it; on exit the hooks are removed and the rank serves the
    others until every rank has left its context (:meth:`serve`).

    Raises:
        RuntimeError: ranks announce different MoE layers (they are out of step).
    """

    def __init__(self, models: List[nn.Module]):
        self.layers = [m for model in models for m in moe_layers(model) if m.group is not None]
        self.group = self.layers[0].group if self.layers else None
        self._hooks = []

    @property
    def active(self) -> bool:
        """True when the models' experts are sharded over several ranks."""
        return bool(self.layers)

    def _exchange(self, values) -> List[int]:
        device = next(self.layers[0].parameters()).device
        t = torch.tensor(values, dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def _announce(self, index: int):
        def hook(module, args):
            dist.all_reduce(torch.tensor([index, -index, 1], dtype=torch.long, device=module.gate.wg.weight.device),
                            op=dist.ReduceOp.MAX, group=self.group)  # no host sync on working ranks
        return hook

    def __enter__(self):
        for i, m in enumerate(self.layers, start=1):
            self._hooks.append(m.register_forward_pre_hook(self._announce(i)))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if exc_type is None:
            self.serve(final=False)

    def serve(self, final: bool = False) -> int:
        """Take part in the other ranks' MoE layers with zero tokens until they are done.

        Args:
            final: this rank has no more work at all: wait until no rank is busy (else only
                until every rank has finished its current lockstep).

        Returns:
            the number of zero-token layer forwards run.
        """
        if not self.active:
            return 0
        served = 0
        while True:
            top, neg_low, busy = self._exchange([0, -_BIG, 0 if final else 1])
            if top == 0:
                if not final or busy == 0:
                    return served
                continue
            if -neg_low != top:
                raise RuntimeError(f"expert-parallel ranks out of step: MoE layers {-neg_low} and {top} at once")
            self._zero_token_forward(self.layers[top - 1])
            served += 1

    @staticmethod
    def _zero_token_forward(layer) -> None:
        w = layer.gate.wg.weight  # [E, d] in the model's dtype, on its device
        counters = layer.eval_counters()
        with torch.no_grad():
            layer.forward(w.new_zeros(0, w.shape[1]))  # forward(), not __call__: no hooks (run report, lockstep)
        layer.restore_eval_counters(counters)


def lockstep_for(models: List[nn.Module]) -> Optional[MoELockstep]:
    """A :class:`MoELockstep` for ``models`` when their experts are sharded, else None."""
    if max((expert_parallel_world(m) for m in models), default=1) == 1:
        return None
    return MoELockstep(models)


# ----------------------------------------------------------------------------- generate

class _Recorder:
    """A text stream that keeps what ``fairseq_cli.generate._main`` prints."""

    def __init__(self):
        self.parts: List[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def lines(self) -> List[str]:
        return "".join(self.parts).splitlines()


class _RecordingScorer:
    """Wraps fairseq's scorer to record its inputs (replayed on rank 0 in one-process order).

    ``add`` / ``add_string`` exist only where the wrapped scorer has them (generate picks the
    method with ``hasattr``)."""

    def __init__(self, scorer):
        self.scorer, self.calls = scorer, []

    def __getattr__(self, name):
        attr = getattr(self.scorer, name)
        if name not in ("add", "add_string"):
            return attr

        def record(ref, pred):
            keep = [x.clone() if torch.is_tensor(x) else x for x in (ref, pred)]
            self.calls.append((name, *keep))
            return attr(ref, pred)

        return record


class _GenerateRun:
    """What one rank of an expert-parallel ``fairseq-generate`` saw: batch ids, scorer, models."""

    current: Optional["_GenerateRun"] = None

    def __init__(self):
        self.batches: List[List[int]] = []
        self.scorer: Optional[_RecordingScorer] = None
        self.models: List[nn.Module] = []
        self.tgt_dict = None


def note_batch(models: List[nn.Module], sample: dict) -> None:
    """Called by the task's ``inference_step``: records the batch's sentence ids (in the order
    fairseq prints them) and the models, when an expert-parallel generate run is recording."""
    run = _GenerateRun.current
    if run is not None and sample is not None and "id" in sample:
        run.batches.append(sample["id"].tolist())
        run.models = models


def _merged_ids(per_rank: List[dict]) -> List[int]:
    """Sentence ids in one process's order: fairseq's sharding gives rank r the batches r, r + N, ...
    of the unsharded iterator, so batch b is batch b // N of rank b % N."""
    ids = []
    for j in range(max(len(r["batches"]) for r in per_rank)):
        for r in per_rank:
            if j < len(r["batches"]):
                ids.extend(r["batches"][j])
    return ids


def _generate_worker(cfg) -> None:
    """One rank of ``fairseq-generate`` with sharded experts (after fairseq's distributed_init)."""
    import fairseq.scoring as scoring
    import fairseq_cli.generate as generate
    from fairseq import utils

    utils.import_user_module(cfg.common)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.generation.lm_path is not None:
        exit_with_error("expert-parallel fairseq-generate does not support --lm-path; run it on one process")
    out_path = None
    if cfg.common_eval.results_path is not None:
        os.makedirs(cfg.common_eval.results_path, exist_ok=True)
        out_path = os.path.join(cfg.common_eval.results_path, f"generate-{cfg.dataset.gen_subset}.txt")
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout if rank == 0 else sys.stderr)

    run, recorder = _GenerateRun(), _Recorder()
    build_scorer = scoring.build_scorer

    def recording_build_scorer(scoring_cfg, tgt_dict):
        run.scorer, run.tgt_dict = _RecordingScorer(build_scorer(scoring_cfg, tgt_dict)), tgt_dict
        return run.scorer

    # fairseq.scoring.build_scorer (called once by generate's _main): record the scorer's inputs
    scoring.build_scorer, _GenerateRun.current = recording_build_scorer, run
    try:
        try:
            generate._main(cfg, recorder)
        except ZeroDivisionError:
            # generate's last log line divides by this rank's generation time: zero when fairseq's
            # sharding left it no batch (fewer batches than ranks)
            if run.batches:
                raise
    finally:
        scoring.build_scorer, _GenerateRun.current = build_scorer, None
    models = run.models or [m for m in _BUILT if m is not None]
    lockstep = lockstep_for(models)
    if lockstep is not None:
        lockstep.serve(final=True)

    by_id, other = {}, []
    for line in recorder.lines():
        m = _ID_LINE.match(line)
        if m:
            by_id.setdefault(int(m.group(1)), []).append(line)
        else:
            other.append(line)
    calls = {}
    if run.scorer is not None:
        ids_in_order = [i for b in run.batches for i in b]
        calls = dict(zip(ids_in_order, run.scorer.calls))
    mine = {"batches": run.batches, "by_id": by_id, "calls": calls}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    end_expert_parallel_run()
    if rank != 0:
        return
    by_id = {sid: ls for r in gathered for sid, ls in r["by_id"].items()}
    lines = [line for sid in _merged_ids(gathered) for line in by_id.get(sid, [])]
    final_prefix = f"Generate {cfg.dataset.gen_subset} with beam={cfg.generation.beam}: "
    if run.scorer is not None and any(line.startswith(final_prefix) for line in other):
        scorer = build_scorer(cfg.scoring, run.tgt_dict)  # replay every rank's inputs in one-process order
        calls = {sid: call for r in gathered for sid, call in r["calls"].items()}
        for sid in _merged_ids(gathered):
            if sid in calls:
                kind, ref, pred = calls[sid]
                getattr(scorer, kind)(ref, pred)
        other = [final_prefix + scorer.result_string() if line.startswith(final_prefix) else line for line in other]
    n_all = sum(len(b) for r in gathered for b in r["batches"])
    logger.info(f"expert parallel: {world} ranks translated {n_all:,} sentences (this rank: "
                f"{sum(len(b) for b in run.batches):,}); output below is all ranks' in one-process order")
    text = "\n".join(lines + other) + "\n"
    if out_path is not None:
        with open(out_path, "w", encoding="utf-8") as h:
            h.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# the list of the expert-parallel models built by moe_* tasks in this process (a rank that never
# ran a batch serves the others with these)
_BUILT: list = []


def note_built_model(model: nn.Module) -> None:
    """Called by the ``moe_*`` tasks' ``build_model``."""
    if expert_parallel_world(model) > 1:
        _BUILT.append(model)


def _is_moe_task(cfg) -> bool:
    name = getattr(cfg.task, "_name", None) or getattr(cfg.task, "task", None) or ""
    return str(name).startswith("moe_")


def generate_main(cfg):
    """``fairseq_cli.generate.main`` for ``moe_*`` tasks with ``--distributed-world-size N > 1``:
    start the N ranks through fairseq's ``call_main`` (see the module docstring)."""
    from argparse import Namespace

    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    if isinstance(cfg, Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    if cfg.distributed_training.distributed_world_size <= 1 or not _is_moe_task(cfg):
        return _original("generate")(cfg)
    assert cfg.common_eval.path is not None, "--path required for generation!"
    distributed_utils.call_main(cfg, _generate_worker)


# ----------------------------------------------------------------------------- interactive

def _broadcast_buffers(read, source_of):
    """``fairseq_cli.interactive.buffered_read`` where rank 0 reads and every rank gets its buffers."""

    def buffered_read(input, buffer_size):
        rank = dist.get_rank()
        it = read(source_of(input), buffer_size) if rank == 0 else None
        while True:
            box = [next(it, None) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            yield box[0]

    return buffered_read


def _stdin_of_launcher(input: str) -> str:
    # torch.multiprocessing.spawn gives its workers /dev/null as stdin; rank 0 reads its launcher's
    if input == "-" and multiprocessing.parent_process() is not None and os.path.exists(f"/proc/{os.getppid()}/fd/0"):
        return f"/proc/{os.getppid()}/fd/0"
    return input


def interactive_main(cfg, **kwargs):
    """``fairseq_cli.interactive.main`` (run by fairseq's ``call_main`` on every rank): when the
    process group spans several ranks and the task is ``moe_*``, rank 0's input is broadcast,
    only rank 0 prints, and the ranks serve each other until all are done."""
    original = _original("interactive")
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not _is_moe_task(cfg):
        return original(cfg, **kwargs)
    g = original.__globals__
    read = g["buffered_read"]
    g["buffered_read"] = _broadcast_buffers(read, _stdin_of_launcher)
    quiet = contextlib.redirect_stdout(open(os.devnull, "w")) if dist.get_rank() != 0 else contextlib.nullcontext()
    try:
        with quiet:
            original(cfg, **kwargs)
    finally:
        g["buffered_read"] = read
    lockstep = lockstep_for([m for m in _BUILT if m is not None])
    if lockstep is not None:
        lockstep.serve(final=True)
    end_expert_parallel_run()


# ----------------------------------------------------------------------------- installation

_ORIGINAL: dict = {}


def _original(name: str):
    """fairseq's own ``fairseq_cli.<name>.main``."""
    if name not in _ORIGINAL:
        import importlib

        _ORIGINAL[name] = importlib.import_module(f"fairseq_cli.{name}").main
    return _ORIGINAL[name]


def install_generate_hooks() -> None:
    """Replace ``main`` of ``fairseq_cli.generate`` and ``fairseq_cli.interactive`` (and of their
    ``__main__`` copies) by :func:`generate_main` / :func:`interactive_main`, where the tool is
    running (once; they call the originals for anything but an expert-parallel ``moe_*`` run)."""
    for name, wrapper in (("generate", generate_main), ("interactive", interactive_main)):
        for mod in loaded_tool_modules(name):
            if getattr(mod, "main", wrapper) is wrapper:
                continue
            _ORIGINAL.setdefault(name, mod.main)
            mod.main = wrapper


__all__ = ["MoELockstep", "lockstep_for", "install_generate_hooks", "note_batch", "note_built_model"]
