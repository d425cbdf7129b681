"""Trace replay for ``bench_end_to_end.py --workloads mt-replay``: expert buffering with real routing.

The NLLB-shaped benchmark model has random weights, so its own gates route without the
locality of a trained model. :class:`TraceReplay` replaces the top-k choices of its decoder
MoE gates with choices recorded from a trained model (``--moe-record-trace``): model decoder
MoE layer ``i`` replays recorded decoder layer ``i mod L_trace``; recorded expert ``j`` becomes
model expert ``j * E_model / E_trace`` (so the model uses as many distinct experts, with the
same co-occurrence, as the trained model did); each call takes the next recorded calls of that
layer until it has a choice for each of its tokens. Gate probabilities stay the model's (they
only weight the combine). The cursors restart at every :meth:`TraceReplay.reset`, so repeated
timed runs see identical routing, and the lookups of one run (:attr:`TraceReplay.log`) are the
future that the ``belady`` policy replays.

:func:`replay_rows` measures, for 1, 8 and 64 sentences per batch (beam 4, 32 generated
tokens), the ``fairseq`` ``SequenceGenerator`` time per generated token and the GPU memory of
the all-resident dynamic model and of the decoder experts buffered with K slots per layer for
each K and eviction policy (Huang et al. 2024, Fig. 13). Encoder experts stay resident.
Optionally also with the miss handling of issue #11 item 5 (``prefetches``: ``previous-step``
prefetching, ``--moe-prefetch``; ``cpu_modes``: ``auto`` CPU experts, ``--moe-cpu-experts``):
each row then says which, and gives the prefetch and CPU-expert statistics. The ``gate``
predictor is refused here: the replay overrides the gates' routing, so a gate's prediction says
nothing about it (``benchmarks/prefetch_generate.py`` measures ``gate`` on the trained model).
"""

import time

import numpy as np
import torch

from benchmarks.common import median_time_s
from fairseq_moe_infer.moe import moe_layers
from fairseq_moe_infer.moe.buffered import ExpertBuffer
from fairseq_moe_infer.moe.gate import Routing
from fairseq_moe_infer.moe.prefetch import build_predictor
from fairseq_moe_infer.trace import merge_rank_traces


class TraceReplay:
    """Forward hooks on the decoder MoE gates of ``model`` that return recorded choices.

    Args:
        model: fairseq model (the benchmark's MT model).
        trace_paths: routing traces of a trained MT MoE model (merged in order).

    Raises:
        ValueError: the trace has no decoder layers, or E_model is not a multiple of E_trace.
    """

    def __init__(self, model, trace_paths, allow_incomplete: bool = False):
        t = merge_rank_traces(trace_paths, allow_incomplete=allow_incomplete)
        dec = [i for i, n in enumerate(t.layer_names) if n.startswith("decoder.")]
        if not dec:
            raise ValueError(f"{trace_paths}: no decoder MoE layer in the trace; record fairseq-generate of an MT model")
        self.layers = [(n, m) for n, m in moe_layers(model, named=True) if n.startswith("decoder.")]
        E = self.layers[0][1].num_experts
        if E % t.num_experts:
            raise ValueError(f"the model's {E} experts are not a multiple of the trace's {t.num_experts}")
        self.scale = E // t.num_experts
        self.trace = t
        self.calls = {name: t.calls_of(dec[i % len(dec)]) for i, (name, _) in enumerate(self.layers)}
        self.cursor = {}
        self.log = {name: [] for name, _ in self.layers}
        self.logging = False
        for name, m in self.layers:
            m.gate.register_forward_hook(self._hook(name))
        self.reset()

    def reset(self) -> None:
        """Restart every layer at the first recorded call."""
        self.cursor = {name: 0 for name in self.calls}

    def _take(self, name: str, n: int) -> np.ndarray:
        calls, parts, have = self.calls[name], [], 0
        while have < n:
            c = self.trace.call_choices(calls[self.cursor[name] % len(calls)])
            self.cursor[name] += 1
            parts.append(c)
            have += len(c)
        return np.concatenate(parts)[:n]

    def _hook(self, name):
        def hook(gate, args, routing):
            T = routing.expert_indices.shape[0]
            c = self._take(name, T).astype(np.int64)
            valid = c >= 0
            mapped = np.where(valid, c * self.scale, 0)
            if self.logging:
                self.log[name].append(np.unique(mapped[valid]).tolist())
            idx = torch.from_numpy(mapped).to(routing.expert_indices.device, non_blocking=True)
            ok = torch.from_numpy(valid).to(routing.valid.device, non_blocking=True) & routing.valid[:, :1]
            return Routing(idx, routing.probs, ok, routing.l_aux, routing.num_experts, routing.renormalize_after_dropping)

        return hook


def replay_rows(model, task, trace_paths, sentences=(1, 8, 64), fractions=(16, 8, 4, 2, 1),
                policies=("lifo", "lru", "fifo", "lfu", "belady"), repeat=3, deadline=None, save=lambda rows: None,
                src_len=64, out_len=32, beam=4, prefetches=("none",), cpu_modes=("off",), allow_incomplete=False):
    """Rows of the trace-replay benchmark (see the module docstring).

    Each row: ``sentences``, ``K`` (``all-resident`` for the baseline), ``policy``, ``prefetch``,
    ``cpu_experts``, ``ms_per_token`` (generate time / generated tokens per sentence),
    ``x_all_resident`` (ratio to the baseline of the same batch), ``decoder_expert_GiB`` (device
    bytes of the decoder's experts), ``peak_memory_GiB`` and the buffer statistics summed over the
    decoder layers (with prefetching: prefetches, prefetch hits, wasted GiB, misses saved; with CPU
    experts: CPU runs and tokens, GiB not copied, the cost model's rates of the first layer).

    Raises:
        ValueError: the ``gate`` predictor (see the module docstring) or an unknown one.
    """
    from fairseq.sequence_generator import SequenceGenerator

    if "gate" in prefetches:
        raise ValueError("--replay-prefetch gate: the replay overrides the gates' routing, so the gate predictor has "
                         "nothing to predict; measure it with benchmarks/prefetch_generate.py")
    device = next(model.parameters()).device
    replay = TraceReplay(model, trace_paths, allow_incomplete)
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=0, max_len_b=out_len,
                            min_len=out_len)
    vocab = len(task.source_dictionary)
    layers = replay.layers
    E_local = layers[0][1].experts.num_local_experts
    rows, hosts = [], {}

    def sample(b):
        g = torch.Generator(device=device).manual_seed(b)
        src = torch.randint(4, vocab, (b, src_len), device=device, generator=g)
        return {"net_input": {"src_tokens": src, "src_lengths": torch.full((b,), src_len, device=device)}}

    def measure(b, runs):
        s = sample(b)

        def fn():
            replay.reset()
            with torch.no_grad():
                gen.generate([model], s)

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = 1000 * median_time_s(fn, device, warmup=1, repeat=runs)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return ms, peak

    def expert_bytes(m):
        return sum(getattr(m.experts, n).numel() * getattr(m.experts, n).element_size()
                   for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))

    logs, base = {}, {}
    resident_bytes = sum(expert_bytes(m) for _, m in layers)
    for b in sentences:  # first the all-resident model (the decoder experts are still on the device)
        replay.logging = True
        replay.reset()
        with torch.no_grad():
            gen.generate([model], sample(b))  # one run to log the lookups (belady's future)
        replay.logging = False
        logs[b] = {name: list(v) for name, v in replay.log.items()}
        for v in replay.log.values():
            v.clear()
        ms, peak = measure(b, repeat)
        base[b] = ms
        rows.append({"sentences": b, "K": "all-resident", "policy": "dynamic", "ms_per_token": round(ms / out_len, 3),
                     "x_all_resident": 1.0, "decoder_expert_GiB": round(resident_bytes / 2**30, 3),
                     "peak_memory_GiB": None if peak is None else round(peak, 2)})
        save(rows)
        print(rows[-1], flush=True)
    variants = [(policy, p, c) for policy in policies for p in prefetches for c in cpu_modes]
    for b in sentences:
        run_log = logs[b]
        for frac in fractions:
            K = max(1, E_local // frac)
            for policy, prefetch, cpu in variants:
                head = {"sentences": b, "K": K, "policy": policy, "prefetch": prefetch, "cpu_experts": cpu}
                if deadline is not None and time.time() > deadline:
                    rows.append({**head, "skipped": "time budget"})
                    save(rows)
                    continue
                for name, m in layers:
                    future = [[e - m.experts.global_offset for e in look] for look in run_log[name]] * (1 + repeat + 1)
                    buf = ExpertBuffer(E_local, K, policy, future if policy == "belady" else None, prefetch=prefetch,
                                       cpu_experts=cpu)
                    if name in hosts:
                        buf.adopt(hosts[name])
                    m.experts.set_buffer(buf)
                predictor = build_predictor(prefetch, model) if prefetch != "none" else None
                ms, peak = measure(b, repeat)
                if predictor is not None:
                    predictor.remove()
                for name, m in layers:
                    hosts.setdefault(name, m.experts.buffer)
                stats = [m.experts.buffer.stats() for _, m in layers]
                lookups = sum(s["lookups"] for s in stats)
                runs = 1 + repeat

                def total(key):
                    return sum(s.get(key, 0) for s in stats)

                row = {**head, "ms_per_token": round(ms / out_len, 3), "x_all_resident": round(ms / base[b], 3),
                       "decoder_expert_GiB": round(total("device_bytes_buffered") / 2**30, 3),
                       "decoder_expert_GiB_all_resident": round(total("device_bytes_all_resident") / 2**30, 3),
                       "peak_memory_GiB": None if peak is None else round(peak, 2),
                       "miss_rate": round(total("misses") / lookups, 4) if lookups else None,
                       "GiB_copied_per_run": round(total("bytes_copied_h2d") / 2**30 / runs, 3),
                       "copy_s": round(total("copy_s"), 4),
                       "copy_overlapped_s": round(total("copy_overlapped_s"), 4)}
                if prefetch != "none":
                    row.update({"prefetches_per_run": round(total("prefetches") / runs, 1),
                                "prefetch_hits_per_run": round(total("prefetch_hits") / runs, 1),
                                "wasted_prefetch_GiB_per_run": round(total("wasted_prefetch_bytes") / 2**30 / runs, 3),
                                "miss_rate_without_prefetch": round(total("misses_without_prefetch") / lookups, 4)
                                if lookups else None,
                                "misses_saved_per_run": round(total("misses_saved") / runs, 1)})
                if cpu == "auto":
                    row.update({"cpu_runs_per_run": round(total("cpu_runs") / runs, 1),
                                "cpu_tokens_per_run": round(total("cpu_tokens") / runs, 1),
                                "GiB_not_copied_per_run": round(total("copy_bytes_avoided") / 2**30 / runs, 3),
                                "cpu_s": round(total("cpu_s"), 4), "cpu_cost_rates": stats[0]["cpu_cost_rates"]})
                rows.append(row)
                save(rows)
                print(row, flush=True)
    for _, m in layers:
        m.experts.set_buffer(None)
    return rows


def plot_replay(rows, png):
    """ms per token against K, one panel per batch size, one line per policy (dashed: all resident)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["sentences"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], sizes):
        mine = [r for r in rows if r["sentences"] == b and "ms_per_token" in r]
        for r in mine:
            if r["K"] == "all-resident":
                ax.axhline(r["ms_per_token"], ls="--", color="k", label="all resident (dynamic)")
        def label(r):
            extra = [f"prefetch {r['prefetch']}"] * (r.get("prefetch", "none") != "none")
            extra += ["CPU experts"] * (r.get("cpu_experts", "off") == "auto")
            return " + ".join([r["policy"]] + extra)

        buffered = [r for r in mine if r["K"] != "all-resident"]
        for name in sorted({label(r) for r in buffered}):
            pts = sorted((r["K"], r["ms_per_token"]) for r in buffered if label(r) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{b} sentence(s) per batch, beam 4")
        ax.set_xlabel("decoder slots K per MoE layer")
        ax.set_ylabel("ms per generated token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
