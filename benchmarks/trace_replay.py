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
"""

import time

import numpy as np
import torch

from benchmarks.common import median_time_s
from fairseq_moe_infer.moe import moe_layers
from fairseq_moe_infer.moe.buffered import ExpertBuffer
from fairseq_moe_infer.moe.gate import Routing
from fairseq_moe_infer.trace import merge_rank_traces


class TraceReplay:
    """Forward hooks on the decoder MoE gates of ``model`` that return recorded choices.

    Args:
        model: fairseq model (the benchmark's MT model).
        trace_paths: routing traces of a trained MT MoE model (merged in order).

    Raises:
        ValueError: the trace has no decoder layers, or E_model is not a multiple of E_trace.
    """

    def __init__(self, model, trace_paths):
        t = merge_rank_traces(trace_paths)
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
                src_len=64, out_len=32, beam=4):
    """Rows of the trace-replay benchmark (see the module docstring).

    Each row: ``sentences``, ``K`` (``all-resident`` for the baseline), ``policy``, ``ms_per_token``
    (generate time / generated tokens per sentence), ``x_all_resident`` (ratio to the baseline of
    the same batch), ``decoder_expert_GiB`` (device bytes of the decoder's experts),
    ``peak_memory_GiB`` and the buffer statistics summed over the decoder layers.
    """
    from fairseq.sequence_generator import SequenceGenerator

    device = next(model.parameters()).device
    replay = TraceReplay(model, trace_paths)
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
    for b in sentences:
        run_log = logs[b]
        for frac in fractions:
            K = max(1, E_local // frac)
            for policy in policies:
                if deadline is not None and time.time() > deadline:
                    rows.append({"sentences": b, "K": K, "policy": policy, "skipped": "time budget"})
                    save(rows)
                    continue
                for name, m in layers:
                    future = [[e - m.experts.global_offset for e in look] for look in run_log[name]] * (1 + repeat + 1)
                    buf = ExpertBuffer(E_local, K, policy, future if policy == "belady" else None)
                    if name in hosts:
                        buf.adopt(hosts[name])
                    m.experts.set_buffer(buf)
                ms, peak = measure(b, repeat)
                for name, m in layers:
                    hosts.setdefault(name, m.experts.buffer)
                stats = [m.experts.buffer.stats() for _, m in layers]
                lookups = sum(s["lookups"] for s in stats)
                row = {"sentences": b, "K": K, "policy": policy, "ms_per_token": round(ms / out_len, 3),
                       "x_all_resident": round(ms / base[b], 3),
                       "decoder_expert_GiB": round(sum(s["device_bytes_buffered"] for s in stats) / 2**30, 3),
                       "decoder_expert_GiB_all_resident": round(sum(s["device_bytes_all_resident"] for s in stats) / 2**30, 3),
                       "peak_memory_GiB": None if peak is None else round(peak, 2),
                       "miss_rate": round(sum(s["misses"] for s in stats) / lookups, 4) if lookups else None,
                       "GiB_copied_per_run": round(sum(s["bytes_copied_h2d"] for s in stats) / 2**30 / (1 + repeat), 3),
                       "copy_s": round(sum(s["copy_s"] for s in stats), 4),
                       "copy_overlapped_s": round(sum(s["copy_overlapped_s"] for s in stats), 4)}
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
        for policy in sorted({r["policy"] for r in mine if r["K"] != "all-resident"}):
            pts = sorted((r["K"], r["ms_per_token"]) for r in mine if r["policy"] == policy and r["K"] != "all-resident")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{b} sentence(s) per batch, beam 4")
        ax.set_xlabel("decoder slots K per MoE layer")
        ax.set_ylabel("ms per generated token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
