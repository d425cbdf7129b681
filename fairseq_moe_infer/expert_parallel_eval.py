"""``fairseq-eval-lm --distributed-world-size N`` with experts sharded over the N ranks.

fairseq's eval-lm gives each rank a shard of the batches, padded with empty
batches so that all shards have the same length, and skips the empty ones
without running the model. With sharded experts every forward is a collective
(all-to-all), so a rank that skips a batch would leave the others waiting. It
also logs each rank's own loss only. :func:`eval_lm` wraps
``fairseq_cli.eval_lm.eval_lm`` (the function ``fairseq-eval-lm`` calls per run;
installed by :mod:`fairseq_moe_infer.fairseq_patches`) so that, when the models'
experts are sharded:

* an empty batch runs a one-token dummy forward through every model (its MoE
  counters are restored, so the end-of-run summary counts real tokens only);
* the returned loss and perplexity are those of all ranks' tokens together
  (token-weighted mean of the ranks' base-2 losses), so fairseq's own final
  ``Loss (base 2): ..., Perplexity: ...`` line is the whole set's on every rank.

Token counting follows eval-lm: a batch's ``ntokens`` minus one token per
sentence when ``remove_bos_token`` (eval-lm also drops tokens scored +-inf,
which it logs; their count is not seen here). ``--post-process``/``--remove-bpe``
(eval-lm then scores merged words) is refused under expert parallelism, and so is
``--context-window`` by the ``moe_language_modeling`` task (fairseq gives each rank
every W-th batch, so a rank's context would come from its own previous batch, not
the preceding text: a different perplexity than one process).
"""

import functools
import math
from typing import Iterable, Iterator, List

import torch
from torch import nn

from .bounded_waits import end_expert_parallel_run
from .cli import exit_with_error, loaded_tool_modules
from .moe import moe_layers
from .training import expert_parallel_world

ALL_RANKS_LINE = "expert parallel: this rank's loss (base 2) {:.4f} on {:,} tokens; all ranks {:.4f} on {:,} tokens"


def _dummy_forward(models: List[nn.Module], eos: int) -> None:
    """One forward of a single EOS token through each model, leaving MoE counters as they were."""
    for model in models:
        layers = moe_layers(model)
        saved = [m.eval_counters() for m in layers]
        device = next(model.parameters()).device
        tokens = torch.full((1, 1), eos, dtype=torch.long, device=device)
        with torch.no_grad():
            model(src_tokens=tokens, src_lengths=torch.ones(1, dtype=torch.long, device=device))
        for m, counters in zip(layers, saved):
            m.restore_eval_counters(counters)


class _MatchedBatches:
    """Iterates fairseq's batches, running a dummy forward for each empty one and counting tokens."""

    def __init__(self, batches: Iterable, models: List[nn.Module], eos: int, remove_bos_token: bool):
        self.batches, self.models, self.eos, self.remove_bos = batches, models, eos, remove_bos_token
        self.tokens = 0

    def __iter__(self) -> Iterator:
        for sample in self.batches:
            if "net_input" not in sample:
                _dummy_forward(self.models, self.eos)
            else:
                self.tokens += int(sample["ntokens"]) - (int(sample["nsentences"]) if self.remove_bos else 0)
            yield sample

    def __len__(self):
        return len(self.batches)


def _combine_over_ranks(results: dict, tokens: int, device: torch.device) -> dict:
    import torch.distributed as dist

    t = torch.tensor([results["loss"] * tokens, float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    loss = (t[0] / t[1]).item() if t[1] > 0 else 0.0
    return dict(results, loss=loss, perplexity=2**loss, tokens_all_ranks=int(t[1].item()),
                loss_this_rank=results["loss"])


def eval_lm(original, models, source_dictionary, batch_iterator, *args, **kwargs):
    """Wraps ``fairseq_cli.eval_lm.eval_lm`` as described in the module docstring (no-op where
    the experts are not sharded)."""
    if max((expert_parallel_world(m) for m in models), default=1) == 1:
        return original(models, source_dictionary, batch_iterator, *args, **kwargs)
    if kwargs.get("post_process"):
        # eval-lm then averages over words (BPE continuations merged), a count this wrapper does not see
        exit_with_error(
            "expert-parallel fairseq-eval-lm cannot combine the ranks' losses with --post-process/--remove-bpe; "
            "drop it, or evaluate on one process"
        )
    import fairseq_cli.eval_lm as cli

    remove_bos = kwargs.get("remove_bos_token", False)
    batches = _MatchedBatches(batch_iterator, models, source_dictionary.eos(), remove_bos)
    results = original(models, source_dictionary, batches, *args, **kwargs)
    out = _combine_over_ranks(results, batches.tokens, next(models[0].parameters()).device)
    cli.logger.info(ALL_RANKS_LINE.format(results["loss"], batches.tokens, out["loss"], out["tokens_all_ranks"]))
    end_expert_parallel_run()  # eval-lm's main only logs after this
    if not math.isfinite(out["loss"]):
        raise FloatingPointError("expert-parallel eval-lm: the combined loss is not finite")
    return out


def install_eval_lm_wrap(wrapper) -> None:
    """Install ``wrapper`` (``wrapper(original, *args, **kwargs)``) over ``fairseq_cli.eval_lm.eval_lm``
    (once; no-op where fairseq_cli is not importable), also in the copies of that module which
    ``python -m fairseq_cli.eval_lm`` and fairseq's spawned workers run."""
    try:
        import fairseq_cli.eval_lm  # noqa: F401 (loaded, so that it is wrapped below)
    except ImportError:  # pragma: no cover - fairseq without its CLI
        return
    for module in loaded_tool_modules("eval_lm"):  # cli itself, and its __main__ / __mp_main__ copies
        _wrap(module, wrapper)


def _wrap(cli, wrapper) -> None:
    if getattr(cli.eval_lm, "_moe_wrapped", False):
        return
    original = cli.eval_lm

    @functools.wraps(original)
    def eval_lm(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    eval_lm._moe_wrapped = True
    cli.eval_lm = eval_lm
    # ``main`` looks ``eval_lm`` up in its own globals, which are not the module's dict when
    # multiprocessing re-ran the script for a spawned worker (it copies the globals into a new
    # module): patch them as well
    main = getattr(cli, "main", None)
    if main is not None and getattr(main, "__globals__", {}).get("eval_lm") is original:
        main.__globals__["eval_lm"] = eval_lm
