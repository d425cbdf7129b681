"""End-of-run MoE summary for ``fairseq-eval-lm`` / ``fairseq-generate``.

The stock tools have no end-of-run hook for tasks, so the task registers
:func:`MoERunReport.finish` with ``atexit``. The report covers evaluation-mode
forwards only and gives:

* ``wall_tokens_per_s``: non-padding tokens entering the MoE stacks (first MoE layer
  of the encoder plus first MoE layer of the decoder) over ``wall_s``, the wall time
  from the first to the last MoE-layer forward. That span includes everything the
  tool does in between (attention, beam search, data loading): it is the tool's
  throughput, not the MoE layers' own speed (benchmarks/ measures that with CUDA events);
* ``peak_accelerator_memory_bytes``: ``torch.cuda.max_memory_allocated`` (None on CPU);
* ``dropped`` / ``routed``: top-k choices dropped for capacity / all valid choices;
* per layer: tokens, routed, dropped and tokens per expert;
* with ``--moe-expert-buffer-size``, per layer (``buffer``) and in total: lookups, hits,
  misses, hit rate, bytes copied host to device, copy time and the part that overlapped
  compute, device bytes held by experts buffered vs all resident
  (:meth:`~fairseq_moe_infer.moe.buffered.ExpertBuffer.stats`); with ``--moe-prefetch``
  prefetches issued, prefetch hits, wasted prefetch bytes and the misses saved against the same
  policy without prefetching; with ``--moe-cpu-experts auto`` the experts and tokens run on the
  CPU, the copy bytes that avoided and the cost model's rates.
* per layer, the load of each expert-parallel GPU (``gpu_load``, see
  :func:`gpu_load_summary`): kept top-k choices its expert slots processed, summed over the
  run (``tokens_per_gpu``) and per forward (batch): the slowest GPU sets each step's time, so
  ``step_max_over_mean`` (sum over batches of the largest GPU load over the sum of the mean
  loads) is the slowdown against perfect balance; also the mean and worst per-batch ratio and
  the ratio of the run totals (:func:`fairseq_moe_infer.placement_planner.load_ratios`).
  Under expert parallelism the ranks' per-batch loads are summed with one ``all_reduce`` at the
  end of the run, when every rank has finished
  (:func:`~fairseq_moe_infer.bounded_waits.end_expert_parallel_run`); a run that ended early
  (an error, a lost rank) reports each rank's own loads (``all_ranks`` false).

It is logged (one readable line per layer, then the whole summary as one JSON
line prefixed ``moe_summary``) and written to ``--moe-stats-json`` when given (strict JSON:
``allow_nan=False``). ``complete`` is False when the run ended by an error or an
interruption (SIGINT, SIGTERM, a failed rank): the counts then cover only the batches done, and a
warning line says so (after a lost expert-parallel rank the JSON is written without the log lines:
the tool's one error line stays last; :mod:`~fairseq_moe_infer.bounded_waits`). A process killed
outright (SIGKILL) writes nothing.
Under torch.distributed every rank reports its own tokens (``rank`` and
``world_size`` are added); rank 0 writes ``--moe-stats-json PATH``, rank r > 0
writes ``PATH.rank<r>``.
"""

import atexit
import json
import logging
import time
from typing import Optional

import torch
from torch import nn

from .cli import failed_with_error_line, mark_exiting, run_failed, stop_on_sigterm
from .moe import moe_layers
from .placement_planner import load_ratios

logger = logging.getLogger("fairseq_moe_infer")


class MoERunReport:
    """Collects timing around a model's forwards and summarises its MoE layers.

    Args:
        model: a fairseq model holding :class:`MoELayer` modules.
        gating, eval_capacity_token_fraction: recorded in the summary.
        json_path: where to write the summary (optional).
    """

    def __init__(self, model: nn.Module, gating: str, eval_capacity_token_fraction: float, json_path: Optional[str]):
        self.layers = moe_layers(model, named=True)
        self.gating, self.fraction, self.json_path = gating, eval_capacity_token_fraction, json_path
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self._done = False
        self._gpu_loads: dict = {}
        self._rank = _rank_info()  # now: the process group is gone at exit
        for _, m in self.layers:  # the tools call encoder/decoder directly, so hook the MoE layers
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)
            m.reset_eval_totals()

    def _pre(self, module, args):
        if not module.training and self.t_first is None:
            self.t_first = time.perf_counter()

    def _post(self, module, args, out):
        if not module.training:
            self.t_last = time.perf_counter()

    def summary(self) -> dict:
        """The summary dict (host sync once)."""
        layers = {name: m.eval_totals() for name, m in self.layers}
        buffers = {name: m.experts.buffer.stats() for name, m in self.layers if m.experts.buffer is not None}
        for name, b in buffers.items():
            layers[name]["buffer"] = b
        for name, m in self.layers:
            # all ranks' loads when collect_gpu_loads ran at the end of the run; never a collective
            # at exit (a rank may be gone): else this rank's own loads (all_ranks False)
            layers[name]["gpu_load"] = self._gpu_loads.get(name) or gpu_load_summary(m, reduce=False)
        firsts = {}
        for name, totals in layers.items():
            stack = name.split(".layers.")[0]
            firsts.setdefault(stack, totals["tokens"])
        tokens = sum(firsts.values())
        elapsed = (self.t_last - self.t_first) if self.t_first is not None and self.t_last is not None else 0.0
        routed = sum(v["routed"] for v in layers.values())
        dropped = sum(v["dropped"] for v in layers.values())
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {
            **self._gating(),
            "tokens": tokens,
            "wall_s": round(elapsed, 4),
            "wall_tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "peak_accelerator_memory_bytes": peak,
            "routed": routed,
            "dropped": dropped,
            "drop_rate": round(dropped / routed, 6) if routed else 0.0,
            "layers": layers,
            "complete": not run_failed(),
            **({"buffer": buffer_totals(list(buffers.values()))} if buffers else {}),
            **self._rank,
        }

    def _gating(self) -> dict:
        """``gating`` and ``eval_capacity_token_fraction`` as the layers have them now (a caller may have
        switched them with ``set_gating`` since this report was made; the constructor's values were
        reported then): one name, or ``mixed (a, b)``; the fraction of static gating only."""
        if not self.layers:
            return {"gating": self.gating, "eval_capacity_token_fraction": self.fraction if self.gating == "static" else None}
        names = sorted({m.dispatcher.name for _, m in self.layers})
        fractions = sorted({m.dispatcher.eval_capacity_token_fraction for _, m in self.layers if m.dispatcher.name == "static"})
        return {"gating": names[0] if len(names) == 1 else f"mixed ({', '.join(names)})",
                "eval_capacity_token_fraction": (fractions[0] if len(fractions) == 1 else fractions) if fractions else None}

    def finish(self) -> Optional[dict]:
        """Log the summary once, if any evaluation forward happened (or, on an expert-parallel rank
        that got no batch of its own, it served the other ranks' tokens: :meth:`collect_gpu_loads`
        ran; its summary has 0 tokens and is written too, so the ranks' files add up)."""
        if self._done or (self.t_first is None and not self._gpu_loads):
            return None
        self._done = True
        mark_exiting()
        s = self.summary()
        quiet = failed_with_error_line()  # the tool's one error line stays the last line of the run
        if not s["complete"] and not quiet:
            logger.warning("MoE summary of an interrupted or failed run: the counts cover only the batches done "
                           "(\"complete\": false)")
        if quiet:
            self._write(s)
            return s
        logger.info(
            "MoE summary: gating=%s tokens=%d wall tokens/s=%s dropped=%d/%d (%.2f%%) peak accelerator memory=%s",
            s["gating"], s["tokens"], s["wall_tokens_per_s"], s["dropped"], s["routed"], 100 * s["drop_rate"],
            "n/a" if s["peak_accelerator_memory_bytes"] is None else f"{s['peak_accelerator_memory_bytes'] / 2**20:.0f} MiB",
        )
        for name, v in s["layers"].items():
            logger.info("MoE %s: tokens per expert %s (dropped %d)", name, v["expert_counts"], v["dropped"])
            g = v["gpu_load"]
            if g["world_size"] > 1:
                logger.info("MoE %s: tokens per GPU %s, per-batch max/mean %.3f (worst batch %.3f, run totals %.3f)",
                            name, g["tokens_per_gpu"], g["step_max_over_mean"] or 0, g["worst_batch_max_over_mean"] or 0,
                            g["run_max_over_mean"] or 0)
            if "buffer" in v:
                logger.info("MoE %s: %s", name, _buffer_line(v["buffer"]))
        if "buffer" in s:
            logger.info("MoE expert buffer, all layers: %s", _buffer_line(s["buffer"]))
        self._write(s)
        logger.info("moe_summary %s", json.dumps(s, allow_nan=False))
        return s

    def _write(self, s: dict) -> None:
        if self.json_path:
            rank = s.get("rank", 0)
            path = self.json_path if rank == 0 else f"{self.json_path}.rank{rank}"
            try:
                with open(path, "w") as f:
                    json.dump(s, f, indent=1, allow_nan=False)
            except OSError as e:  # checked at start; the folder may have gone since
                logger.error("could not write --moe-stats-json %s: %s", path, e)

    def collect_gpu_loads(self) -> None:
        """Sum the expert-parallel ranks' per-batch GPU loads (one ``all_reduce`` per layer), kept
        for the summary. A collective: every rank calls it at the same point, when all have done
        their last MoE forward (:func:`~fairseq_moe_infer.bounded_waits.end_expert_parallel_run`)."""
        self._gpu_loads = {name: gpu_load_summary(m, reduce=True) for name, m in self.layers}

    def _release_process_group(self) -> None:
        # after the run's process group was destroyed: the layers must not keep it alive until
        # interpreter teardown (bounded_waits.end_expert_parallel_run); the summary then uses the
        # loads collected before (collect_gpu_loads)
        for _, m in self.layers:
            m.group = None

    def register_atexit(self) -> "MoERunReport":
        """Log (and write) the summary at interpreter exit, also after SIGINT, SIGTERM
        (:func:`~fairseq_moe_infer.cli.stop_on_sigterm`) or an error (``complete`` false); under
        expert parallelism, collect the ranks' loads at the end of the run first
        (:meth:`collect_gpu_loads`)."""
        from .bounded_waits import at_end_of_run, at_lost_rank

        stop_on_sigterm()
        atexit.register(self.finish)
        at_lost_rank(self.finish)
        if any(m.group is not None for _, m in self.layers):
            at_end_of_run(self.collect_gpu_loads)
            at_end_of_run(self._release_process_group, after_teardown=True)
        return self


_SUMMED = ("calls", "waves", "lookups", "hits", "misses", "bytes_copied_h2d", "device_bytes_buffered",
           "device_bytes_all_resident", "prefetches", "prefetch_hits", "prefetch_unused", "bytes_prefetched",
           "wasted_prefetch_bytes", "misses_without_prefetch", "bytes_copied_without_prefetch", "misses_saved",
           "cpu_runs", "cpu_tokens", "copy_bytes_avoided", "trace_mismatched_calls")


def buffer_totals(stats: list) -> dict:
    """Expert-buffer statistics (:meth:`ExpertBuffer.stats`) summed over layers."""
    total = {key: sum(b[key] for b in stats) for key in _SUMMED if key in stats[0]}
    for key in ("copy_s", "copy_overlapped_s", "cpu_s"):
        if key in stats[0]:
            total[key] = round(sum(b[key] for b in stats), 6)
    total["hit_rate"] = round(total["hits"] / total["lookups"], 6) if total["lookups"] else None
    for key in ("slots", "policy", "prefetch", "cpu_experts"):
        if key in stats[0]:
            total[key] = stats[0][key]
    return total


def _buffer_line(b: dict) -> str:
    rate = "n/a" if b["hit_rate"] is None else f"{100 * b['hit_rate']:.1f}%"
    return (f"expert buffer K={b['slots']} {b['policy']}: lookups={b['lookups']} hits={b['hits']} misses={b['misses']} "
            f"hit rate={rate} copied={b['bytes_copied_h2d'] / 2**20:.1f} MiB in {b['copy_s']:.4f}s "
            f"({b['copy_overlapped_s']:.4f}s overlapped compute) device expert memory "
            f"{b['device_bytes_buffered'] / 2**20:.1f} MiB (all resident {b['device_bytes_all_resident'] / 2**20:.1f} MiB)"
            + (f"; prefetch {b['prefetch']}: {b['prefetches']} issued, {b['prefetch_hits']} hits, "
               f"{b['wasted_prefetch_bytes'] / 2**20:.1f} MiB wasted, misses {b['misses']} vs {b['misses_without_prefetch']} "
               f"without ({b['misses_saved']} saved)" if "prefetch" in b else "")
            + (f"; CPU experts: {b['cpu_runs']} runs, {b['cpu_tokens']} tokens, {b['cpu_s']:.4f}s, "
               f"{b['copy_bytes_avoided'] / 2**20:.1f} MiB not copied" if "cpu_runs" in b else ""))


def gpu_load_summary(layer, reduce: bool = True) -> dict:
    """Load of each expert-parallel GPU for one :class:`MoELayer` (see the module docstring).

    Returns:
        dict: ``world_size``, ``slots_per_gpu``, ``tokens_per_gpu`` ([W] ints, whole run, all
        ranks' tokens), ``all_ranks`` (False when the process group was already destroyed at
        exit, or ``reduce`` is False: then this rank's tokens only), and
        :func:`~fairseq_moe_infer.placement_planner.load_ratios` of the
        [forwards, W] per-batch loads.
    """
    import torch.distributed as dist

    loads = layer.eval_rank_loads()
    all_ranks = layer.group is None or (dist.is_initialized() and reduce)
    if layer.group is not None and all_ranks:
        # ranks may have run different numbers of forwards (lockstep dummy forwards, empty padding
        # batches): agree on the count first, pad with zero rows, then sum (equal shapes on every rank)
        n = torch.tensor([loads.shape[0]], dtype=torch.long, device=loads.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=layer.group)
        padded = loads.new_zeros((int(n.item()), layer.placement.world_size))
        padded[: loads.shape[0]] = loads
        dist.all_reduce(padded, group=layer.group)
        loads = padded
    host = loads.cpu().numpy()
    return {"world_size": layer.placement.world_size, "slots_per_gpu": layer.placement.slots_per_rank,
            "all_ranks": all_ranks,  # False: the process group was gone at exit, this rank's tokens only
            "tokens_per_gpu": host.sum(0).astype(int).tolist() if host.size else [0] * layer.placement.world_size,
            **load_ratios(host)}


def _rank_info() -> dict:
    from .moe.comm import expert_parallel_group

    _, world, rank = expert_parallel_group()
    return {"rank": rank, "world_size": world} if world > 1 else {}
