#!/usr/bin/env python3
"""The paper's characterisation of MoE inference (Huang et al. 2024, Sec. 3), one entry point.

Sub-figures (``--figs``), each written as ``char_<fig>_<tag>.json`` + ``.png`` in ``--out-dir``:

* ``fig7``: inactive experts per MoE layer (experts that receive no token in a batch) for the LM,
  the MT encoder and the MT decoder, from the bundled models' routing traces
  (``benchmarks/results/traces/*.npz``: real routing, recorded by ``fairseq-eval-lm`` /
  ``fairseq-generate --moe-record-trace``), per batch as recorded and per batch of exactly B tokens
  (consecutive pieces of a recorded batch), beside the count expected if routing were uniform.
  No model runs: CPU only.
* ``fig5_6``: throughput (tokens/s) against batch size per gating policy (static with evaluation
  capacity 0.25 and 1.0, dynamic): LM scoring (``fairseq.sequence_scorer.SequenceScorer``, what
  ``fairseq-eval-lm`` runs) and MT generation (``SequenceGenerator``, beam 4), the batch doubling until
  out of memory (predicted or real) or the time budget.
* ``fig8``: MoE against dense latency at equal active parameters: the MoE model (top-2, E experts of
  width f on every ``moe_every``-th layer) against the dense model of the same shape whose every FFN has
  width f * (moe_every + 1) / moe_every (the same active FFN parameters and FLOPs per token over the
  stack); latency of one LM scoring batch and of generating 32 tokens, at small and larger batches.
* ``fig9``: memory: parameters split into embeddings, attention, experts and other (gates, dense FFNs,
  layer norms), and the activations' peak at a batch (GPU only), per gating policy.
* ``fig10``: latency breakdown of a forward into gate, dispatch (+ all-to-all under expert
  parallelism: encode, decode, combine), expert compute and the rest of the model, from device
  events recorded around each MoE layer's gate and expert GEMMs (CUDA events on a GPU, host timers on
  the CPU), per gating policy.

Models (fig5_6, fig8-10): the paper-shaped models of ``benchmarks/bench_end_to_end.py`` built by the
plugin's task with random bf16 weights (LM: 24 layers, d=1024, f=4096, MoE every 2nd layer; MT: 12+12
layers, d=2048, f=8192, MoE every 4th layer; E=128, top-2); ``--toy`` makes them tiny for a CPU check.

Examples:
    python benchmarks/characterize.py --figs fig7 --out-dir benchmarks/results
    python benchmarks/characterize.py --figs fig5_6 fig8 fig9 fig10 --max-minutes 8 --out-dir benchmarks/results
    python benchmarks/characterize.py --figs all --device cpu --toy --out-dir /tmp/char
"""

import argparse
import glob
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_end_to_end as e2e  # noqa: E402
from benchmarks.common import (  # noqa: E402
    free_memory,
    log_row,
    median_time_s,
    oom_marks,
    run_info,
    time_cuda,
    write_json,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGS = ["fig7", "fig5_6", "fig8", "fig9", "fig10"]
TRACE_GROUPS = {"LM": ("lm_", "decoder."), "MT encoder": ("mt_", "encoder."), "MT decoder": ("mt_", "decoder.")}
CATEGORIES = ["embeddings", "attention", "experts", "other"]
PHASES = ["gate", "dispatch_and_all_to_all", "expert_compute", "rest"]
TOY = {"lm": {"d": 64, "f": 128, "heads": 2, "seq": 32, "vocab": 1000},
       "mt": {"d": 64, "f": 128, "heads": 2, "seq": 8, "vocab": 1000, "out_len": 4}}


# ---------------------------------------------------------------- Fig. 7: inactive experts (pure, tested)
def inactive_per_batch(trace, layer, batch_tokens=None) -> np.ndarray:
    """Experts of ``layer`` that receive no top-k choice, per batch.

    Args:
        trace: a :class:`~fairseq_moe_infer.trace.RoutingTrace`.
        layer: MoE layer index or name.
        batch_tokens: None = each recorded call is a batch; B = each call is cut into consecutive
            pieces of exactly B tokens (a call's last, shorter piece and calls under B tokens are left
            out), i.e. batches of B tokens drawn in the recorded order.

    Returns:
        [batches] int64: E minus the number of distinct experts chosen (choices of -1 ignored).
    """
    out = []
    for i in trace.calls_of(layer):
        c = trace.call_choices(i)
        b = batch_tokens
        pieces = [c] if b is None else [c[s:s + b] for s in range(0, len(c) - b + 1, b)]
        for piece in pieces:
            chosen = piece[piece >= 0]
            out.append(trace.num_experts - len(np.unique(chosen)))
    return np.asarray(out, dtype=np.int64)


def uniform_inactive(num_experts: int, k: int, batch_tokens: int) -> float:
    """Expected inactive experts if each token chose k distinct experts uniformly at random:
    E * (1 - k / E) ** B."""
    return num_experts * (1 - k / num_experts) ** batch_tokens


def fig7(trace_dir: str, batch_sizes) -> dict:
    """Per group (LM, MT encoder, MT decoder) and MoE layer: inactive experts per batch (mean, p10,
    p50, p90, max) as recorded and for batches of exactly B tokens, over all of the group's traces."""
    from fairseq_moe_infer.trace import read_trace

    rows, used = [], {}
    for group, (prefix, side) in TRACE_GROUPS.items():
        paths = sorted(glob.glob(os.path.join(trace_dir, prefix + "*.npz")))
        traces = [read_trace(p) for p in paths]
        if not traces:
            continue
        used[group] = [os.path.basename(p) for p in paths]
        layers = [n for n in traces[0].layer_names if n.startswith(side)]
        for name in layers:
            for b in [None] + list(batch_sizes):
                counts = np.concatenate([inactive_per_batch(t, name, b) for t in traces])
                tokens = np.concatenate([t.call_tokens[t.calls_of(name)] for t in traces])
                if not len(counts):
                    continue
                E, k = traces[0].num_experts, traces[0].k
                row = {"group": group, "layer": name, "batch_tokens": "recorded" if b is None else b,
                       "experts": E, "k": k, "batches": int(len(counts)), "mean_inactive": round(float(counts.mean()), 3),
                       "p10": float(np.percentile(counts, 10)), "p50": float(np.percentile(counts, 50)),
                       "p90": float(np.percentile(counts, 90)), "max": int(counts.max()),
                       "share_of_batches_with_inactive": round(float((counts > 0).mean()), 3)}
                if b is None:
                    row["median_tokens_per_batch"] = float(np.median(tokens))
                    row["uniform_expectation_at_median_tokens"] = round(uniform_inactive(E, k, int(np.median(tokens))), 3)
                else:
                    row["uniform_expectation"] = round(uniform_inactive(E, k, b), 3)
                rows.append(row)
    return {"traces_dir": os.path.relpath(trace_dir, REPO), "traces": used, "batch_sizes": list(batch_sizes), "rows": rows}


def plot_fig7(res: dict, path: str) -> None:
    plt = _plt()
    groups = [g for g in TRACE_GROUPS if any(r["group"] == g for r in res["rows"])]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8), squeeze=False, sharey=True)
    sizes = ["recorded"] + res["batch_sizes"]
    for ax, g in zip(axes[0], groups):
        rows = [r for r in res["rows"] if r["group"] == g]
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        width = 0.8 / len(sizes)
        for j, b in enumerate(sizes):
            pts = [next((r for r in rows if r["layer"] == n and r["batch_tokens"] == b), None) for n in layers]
            xs = [i + (j - (len(sizes) - 1) / 2) * width for i, r in enumerate(pts) if r]
            ys = [r["mean_inactive"] for r in pts if r]
            err = [[r["mean_inactive"] - r["p10"] for r in pts if r], [r["p90"] - r["mean_inactive"] for r in pts if r]]
            err = [[max(v, 0) for v in e] for e in err]
            label = "as recorded" if b == "recorded" else f"batches of {b} tokens"
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
            uni = [r.get("uniform_expectation", r.get("uniform_expectation_at_median_tokens")) for r in pts if r]
            ax.scatter(xs, uni, marker="_", s=120, color="k", zorder=3,
                       label="uniform routing, expected" if j == len(sizes) - 1 else None)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([n.replace(".moe_layer", "").replace("layers.", "L") for n in layers], fontsize=8)
        E = rows[0]["experts"]
        med = int(np.median([r["median_tokens_per_batch"] for r in rows if r["batch_tokens"] == "recorded"]))
        ax.set(title=f"{g}\n{E} experts, top-{rows[0]['k']}; recorded batches: median {med} tokens")
        ax.title.set_fontsize(9)
        ax.set_ylim(0, E)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("inactive experts per batch (mean, p10-p90)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Fig. 7: experts receiving no token, bundled models' routing traces", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- Fig. 9: parameter categories (pure, tested)
def param_category(name: str) -> str:
    """Category of a fairseq MoE model's parameter, by its name: ``embeddings`` (token and position
    embeddings, a separate output projection), ``attention`` (self- and encoder-attention projections
    and their layer norms), ``experts`` (``...moe_layer.experts.*``) or ``other`` (gates, dense FFNs,
    the remaining layer norms)."""
    from fairseq_moe_infer.moe import is_expert_key

    if is_expert_key("." + name):
        return "experts"
    if any(s in name for s in ("embed_tokens", "embed_positions", "output_projection")):
        return "embeddings"
    if "self_attn" in name or "encoder_attn" in name:
        return "attention"
    return "other"


def param_bytes_by_category(model) -> dict:
    """Bytes of ``model``'s parameters per :data:`CATEGORIES` (shared tensors counted once)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():
        out[param_category(name)] += p.numel() * p.element_size()
    return out


# ---------------------------------------------------------------- Fig. 10: phase timer
class PhaseTimer:
    """Records the device time of every MoE layer's phases during the forwards run inside ``with``.

    Marks: the whole MoE layer (forward hooks), its gate (forward hooks) and its experts' GEMMs
    (``Experts.forward_grouped`` / ``forward_padded``, wrapped on these instances only and restored on
    exit). On a GPU each mark is a pair of CUDA events on the current stream (so a phase's time is the
    device timeline between its start and end, host gaps included); on the CPU, host timers. Phases:
    gate; dispatch and all-to-all = MoE layer - gate - experts (encode, exchange, decode/combine,
    placement); expert compute; rest = the whole call - MoE layers.
    """

    def __init__(self, model, device: torch.device):
        from fairseq_moe_infer.moe import moe_layers

        self.layers, self.cuda = moe_layers(model), device.type == "cuda"
        self.marks = {"moe": [], "gate": [], "experts": []}
        self.handles, self.patched = [], []

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _hooks(self, module, key):
        open_ = []
        self.handles.append(module.register_forward_pre_hook(lambda m, a: open_.append(self.now())))
        self.handles.append(module.register_forward_hook(lambda m, a, o: self.marks[key].append((open_.pop(), self.now()))))

    def _wrap(self, experts, method):
        inner = getattr(experts, method)

        def timed(*args, **kwargs):
            start = self.now()
            out = inner(*args, **kwargs)
            self.marks["experts"].append((start, self.now()))
            return out

        setattr(experts, method, timed)
        self.patched.append((experts, method))

    def __enter__(self):
        for layer in self.layers:
            self._hooks(layer, "moe")
            self._hooks(layer.gate, "gate")
            for method in ("forward_grouped", "forward_padded"):
                self._wrap(layer.experts, method)
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for obj, method in self.patched:
            delattr(obj, method)  # the class's method shows through again
        self.handles, self.patched = [], []

    def reset(self):
        self.marks = {k: [] for k in self.marks}

    def _ms(self, pair) -> float:
        a, b = pair
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def phases_ms(self, total_ms: float) -> dict:
        """Milliseconds per phase (:data:`PHASES`) of the marks since the last :meth:`reset`, given the
        whole call's ``total_ms``; call after the device finished (synchronize)."""
        moe, gate, experts = (sum(self._ms(p) for p in self.marks[k]) for k in ("moe", "gate", "experts"))
        return {"gate": gate, "dispatch_and_all_to_all": moe - gate - experts, "expert_compute": experts,
                "rest": total_ms - moe}


# ---------------------------------------------------------------- model-level measurements
def timed_ms(fn, device: torch.device, budget_s: float) -> float:
    """Median ms of ``fn(i)`` (i rotates inputs): CUDA events on a GPU, host timer on the CPU."""
    if device.type == "cuda":
        return time_cuda(fn, warmup=1, repeat=5, budget_s=budget_s)["median_ms"]
    i = [0]

    def step():
        fn(i[0])
        i[0] += 1

    return 1000 * median_time_s(step, device, warmup=1, repeat=3)


def dense_ffn_width(kind: str) -> int:
    """FFN width of the dense model with the MoE model's active FFN parameters (top-2 on every
    ``moe_every``-th layer, width f elsewhere): f * (moe_every + 1) / moe_every."""
    s = e2e.SHAPES[kind]
    return s["f"] * (s["moe_every"] + 1) // s["moe_every"]


def dense_args(kind: str) -> list:
    w = str(dense_ffn_width(kind))
    sides = ["decoder"] if kind == "lm" else ["encoder", "decoder"]
    return ["--moe-freq", "0"] + [a for side in sides for a in (f"--{side}-ffn-embed-dim", w)]


def active_params(model, k: int = 2) -> int:
    """Parameters a token uses: all but the experts it is not routed to (k of each layer's E)."""
    from fairseq_moe_infer.moe import moe_layers

    total = sum(p.numel() for p in model.parameters())
    for m in moe_layers(model):
        n = sum(p.numel() for p in m.experts.parameters())
        total -= n - n * k // m.num_experts
    return total


def workload(kind: str, model, task, name: str):
    """(run(batch_tokens, i), count(batch_tokens)) of bench_end_to_end's runners."""
    if name == "lm-eval":
        return e2e.lm_runner(model, task)
    if name == "mt-encoder":
        return e2e.mt_encoder_runner(model, task)
    return e2e.mt_generate_runner(model, task)


def sweep(run, count, start: int, max_tokens: int, deadline: float, device, budget_s: float, label: str, save) -> list:
    """Fig. 5/6: per policy, double the batch until out of memory (predicted from the measured peaks, as
    bench_end_to_end.sweep does, or real), ``max_tokens`` or the policy's share of the time."""
    rows = []
    for n_done, name in enumerate(e2e.POLICIES):
        e2e.set_policy(e2e.MODEL[0], name)
        policy_deadline = time.time() + (deadline - time.time()) / (len(e2e.POLICIES) - n_done)
        bt, peaks = start, []
        while bt <= max_tokens:
            row = {"workload": label, "policy": name, "batch_tokens": count(bt)}
            if time.time() > policy_deadline:
                row["skipped"] = "time budget"
                rows.append(row)
                break
            predicted = e2e.predict_peak_GiB(peaks) if device.type == "cuda" else None
            if predicted is not None and predicted > e2e.MEMORY_HEADROOM * e2e.total_GiB():
                row["skipped"] = f"predicted out of memory ({predicted:.0f} GiB)"
                rows.append(row)
                break
            with oom_marks(row):
                with torch.no_grad():
                    if device.type == "cuda":
                        free_memory()
                        torch.cuda.reset_peak_memory_stats()
                    row["median_ms"] = round(timed_ms(lambda i: run(bt, i), device, budget_s), 3)
                row["tokens_per_s"] = round(count(bt) / (row["median_ms"] / 1000), 1)
                if device.type == "cuda":
                    row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    peaks.append(row["peak_memory_GiB"])
            rows.append(row)
            log_row(row)
            save()
            if row.get("oom"):
                break
            bt *= 2
    return rows


def latency_rows(kind, model, task, label_model, batches, policies, device, budget_s) -> list:
    """Fig. 8: ms per call of LM scoring (a batch of 512-token blocks) or MT generation (32 tokens per
    sentence, beam 4) at the given batches, per policy (None for a dense model)."""
    rows = []
    name = "lm-eval" if kind == "lm" else "mt-generate"
    run, count = workload(kind, model, task, name)
    for policy in policies:
        if policy:
            e2e.set_policy(model, policy)
        for b in batches:
            row = {"model": label_model, "workload": name, "policy": policy or "dense", "batch_tokens": count(b)}
            with oom_marks(row):
                with torch.no_grad():
                    row["median_ms"] = round(timed_ms(lambda i: run(b, i), device, budget_s), 3)
            if device.type == "cuda":
                free_memory()
            rows.append(row)
            log_row(row)
    return rows


def memory_rows(kind, model, task, batch, device) -> list:
    """Fig. 9: parameter bytes per category, and per policy the activations' peak for one call at
    ``batch`` tokens (GPU: max allocated during the call minus allocated before it)."""
    params = param_bytes_by_category(model)
    name = "lm-eval" if kind == "lm" else "mt-encoder"
    run, count = workload(kind, model, task, name)
    rows = []
    for policy in e2e.POLICIES:
        e2e.set_policy(model, policy)
        row = {"model": kind, "workload": name, "policy": policy, "batch_tokens": count(batch),
               **{f"{c}_GiB": round(params[c] / 2**30, 4) for c in CATEGORIES}}
        if device.type == "cuda":
            row["activations_GiB"] = None  # stays None if the call runs out of memory
            with oom_marks(row), torch.no_grad():
                free_memory()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run(batch, 0)
                torch.cuda.synchronize()
                row["activations_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 4)
            free_memory()
        else:
            row["activations_GiB"] = None
            row["note"] = "activations measured on a GPU only"
        rows.append(row)
        log_row(row)
    return rows


def breakdown_rows(kind, model, task, batch, device, repeat: int = 3) -> list:
    """Fig. 10: per policy and workload, mean ms per phase over ``repeat`` calls after one warm-up."""
    rows = []
    for name in (["lm-eval"] if kind == "lm" else ["mt-encoder", "mt-generate"]):
        run, count = workload(kind, model, task, name)
        b = batch if name != "mt-generate" else max(batch // 8, e2e.SHAPES["mt"]["out_len"])
        for policy in e2e.POLICIES:
            e2e.set_policy(model, policy)
            row = {"model": kind, "workload": name, "policy": policy, "batch_tokens": count(b)}
            with oom_marks(row):
                with torch.no_grad():
                    run(b, 0)
                    sums = dict.fromkeys(PHASES, 0.0)
                    totals = []
                    with PhaseTimer(model, device) as timer:
                        for i in range(repeat):
                            timer.reset()
                            t0 = timer.now()
                            run(b, i + 1)
                            t1 = timer.now()
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            total = timer._ms((t0, t1))
                            totals.append(total)
                            for k, v in timer.phases_ms(total).items():
                                sums[k] += v
                row.update({f"{k}_ms": round(v / repeat, 3) for k, v in sums.items()})
                row["total_ms"] = round(statistics.mean(totals), 3)
            if device.type == "cuda":
                free_memory()
            rows.append(row)
            log_row(row)
    return rows


# ---------------------------------------------------------------- plots
def _plt():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import set the root logger to DEBUG

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fig5_6(rows, path):
    plt = _plt()
    labels = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.8), squeeze=False)
    for ax, w in zip(axes[0], labels):
        for policy in e2e.POLICIES:
            pts = sorted((r["batch_tokens"], r["tokens_per_s"]) for r in rows
                         if r["workload"] == w and r["policy"] == policy and "tokens_per_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set(xscale="log", yscale="log", xlabel="batch (tokens)", ylabel="tokens/s", title=w)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fig. 5/6: throughput against batch size per gating policy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fig8(rows, path):
    plt = _plt()
    labels = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.8), squeeze=False)
    for ax, w in zip(axes[0], labels):
        for policy in dict.fromkeys(r["policy"] for r in rows if r["workload"] == w):
            pts = sorted((r["batch_tokens"], r["median_ms"]) for r in rows
                         if r["workload"] == w and r["policy"] == policy and "median_ms" in r)
            if pts:
                label = "dense, equal active parameters" if policy == "dense" else f"MoE, {policy}"
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="batch (tokens)", ylabel="ms per call", title=w)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fig. 8: MoE against dense latency at equal active parameters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stacked(rows, keys, labels, path, title, ylabel, shares=False, unit=""):
    """One stacked bar per row; with ``shares`` each bar is normalised to 100% and its total is written on top."""
    plt = _plt()
    rows = [r for r in rows if not r.get("oom")]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    names = [f"{r.get('model', '')} {r['workload']}\n{r['policy']}" for r in rows]
    totals = np.array([sum(r.get(k) or 0.0 for k in keys) for r in rows], dtype=float)
    bottom = np.zeros(len(rows))
    for k, lab in zip(keys, labels):
        vals = np.array([r.get(k) or 0.0 for r in rows], dtype=float)
        if shares:
            vals = 100 * vals / np.where(totals > 0, totals, 1)
        ax.bar(range(len(rows)), vals, 0.7, bottom=bottom, label=lab)
        bottom += vals
    if shares:
        for i, t in enumerate(totals):
            ax.text(i, 101, f"{t:.3g} {unit}", ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 112)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, fontsize=7)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_models(a, model_figs, results, info, deadline, device, experts, max_tokens, save) -> None:
    """fig5_6 and fig8-10 for each model kind: the MoE model once for all figures, then the dense one (fig8)."""
    for n_kind, kind in enumerate(a.models):
        kind_deadline = time.time() + (deadline - time.time()) / (len(a.models) - n_kind)
        layers = a.layers or (4 if a.toy else (24 if kind == "lm" else 12))  # toy MT: 4 per side, MoE on the 4th
        seq = e2e.SHAPES[kind]["seq"] if kind == "lm" else e2e.SHAPES[kind]["out_len"]
        t0 = time.time()
        model, task = e2e.build(kind, experts, layers)
        e2e.MODEL[0] = model
        info["models"][kind] = {"layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
                                "active_parameters": active_params(model), "build_seconds": round(time.time() - t0, 1)}
        # small-to-moderate batches for latency, memory and breakdown; the sweep takes what time is left
        lat_batches = [seq, 8 * seq]  # LM: 1 and 8 blocks; MT: 1 and 8 sentences
        mid = 16 * e2e.SHAPES[kind]["seq"] if a.toy else 8192
        if "fig9" in model_figs:
            results["fig9"] += memory_rows(kind, model, task, mid, device)
            save()
        if "fig10" in model_figs:
            results["fig10"] += breakdown_rows(kind, model, task, mid, device)
            save()
        if "fig8" in model_figs:
            results["fig8"] += latency_rows(kind, model, task, "moe", lat_batches, ["dynamic", "static-0.25"], device, a.budget_s)
            save()
        if "fig5_6" in model_figs:
            name = "lm-eval" if kind == "lm" else "mt-generate"
            run, count = workload(kind, model, task, name)
            start = e2e.SHAPES[kind]["seq"] if kind == "lm" else 8 * e2e.SHAPES[kind]["out_len"]
            end = kind_deadline - (30 if "fig8" in model_figs and not a.toy else 0)  # leave time for the dense model
            results["fig5_6"] += sweep(run, count, start, max_tokens if kind == "lm" else max_tokens // 8, end, device,
                                       a.budget_s, name, save)
            save()
        model = task = e2e.MODEL[0] = None
        if device.type == "cuda":
            free_memory()
        if "fig8" in model_figs:
            t0 = time.time()
            dense, task = e2e.build(kind, experts, layers, dense_args(kind))
            info["models"][kind + "_dense"] = {"layers": layers, "ffn_width": dense_ffn_width(kind),
                                               "parameters": sum(p.numel() for p in dense.parameters()),
                                               "active_parameters": active_params(dense),
                                               "build_seconds": round(time.time() - t0, 1)}
            results["fig8"] += latency_rows(kind, dense, task, "dense", lat_batches, [None], device, a.budget_s)
            dense = task = None
            if device.type == "cuda":
                free_memory()
            save()


# ---------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figs", nargs="+", default=["all"], choices=FIGS + ["all"])
    p.add_argument("--models", nargs="+", default=["lm", "mt"], choices=["lm", "mt"], help="fig5_6, fig8-10")
    p.add_argument("--experts", type=int, default=None, help="experts per MoE layer (128; --toy: 8)")
    p.add_argument("--layers", type=int, default=None, help="LM layers / MT layers per side (24 / 12; --toy: 4 / 4)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--toy", action="store_true", help="tiny models and batches (a CPU check of the code)")
    p.add_argument("--trace-dir", default=os.path.join(REPO, "benchmarks", "results", "traces"), help="fig7's traces")
    p.add_argument("--fig7-batch-tokens", nargs="+", type=int, default=[16, 64, 256], help="fig7's batch sizes B")
    p.add_argument("--max-tokens", type=int, default=None, help="fig5_6's largest batch (262144; --toy 512)")
    p.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per point at most")
    p.add_argument("--max-minutes", type=float, default=8.0, help="model figures together; later points are skipped")
    p.add_argument("--tag", default=None, help="file name tag (default: h200 on an H200, cpu_toy with --toy, else the device)")
    p.add_argument("--out-dir", required=True)
    a = p.parse_args(argv)
    figs = FIGS if "all" in a.figs else a.figs
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available() and figs != ["fig7"]:
        p.error("--device cuda but no GPU is visible; use --device cpu --toy for a CPU check (fig7 needs neither)")
    if device.type == "cpu":
        torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    tag = a.tag or ("cpu_toy" if a.toy else "h200" if device.type == "cuda" and "H200" in gpu else a.device)
    os.makedirs(a.out_dir, exist_ok=True)

    def out(fig):
        return os.path.join(a.out_dir, f"char_{fig}" + ("" if fig == "fig7" else f"_{tag}"))

    if "fig7" in figs:
        res = fig7(a.trace_dir, a.fig7_batch_tokens)
        write_json(out("fig7") + ".json", {"figure": "fig7_inactive_experts", "run": run_info(argv), **res})
        plot_fig7(res, out("fig7") + ".png")
    model_figs = [f for f in figs if f != "fig7"]
    if not model_figs:
        return
    e2e.DEVICE[0] = a.device
    if a.toy:
        for kind, s in TOY.items():
            e2e.SHAPES[kind].update(s)
    experts = a.experts or (8 if a.toy else 128)
    max_tokens = a.max_tokens or (512 if a.toy else 262144)
    results = {f: [] for f in model_figs}
    info = {"experts": experts, "shapes": {k: dict(e2e.SHAPES[k]) for k in a.models}, "models": {}}
    deadline = time.time() + 60 * a.max_minutes

    def save():
        for f in model_figs:
            write_json(out(f) + ".json", {"figure": f, "run": run_info(argv), "device": a.device, "toy": a.toy,
                                          "info": info, "rows": results[f]})

    try:
        run_models(a, model_figs, results, info, deadline, device, experts, max_tokens, save)
    except KeyboardInterrupt:  # the caller's time box (SIGINT): keep and plot what was measured
        info["interrupted"] = True
        print("interrupted: writing what was measured", file=sys.stderr)
    for r in results.get("fig8", []):  # ratio MoE / dense at the same workload and batch
        d = next((x for x in results["fig8"] if x["policy"] == "dense" and x["workload"] == r["workload"]
                  and x["batch_tokens"] == r["batch_tokens"] and "median_ms" in x), None)
        if d and "median_ms" in r and r["policy"] != "dense":
            r["x_dense"] = round(r["median_ms"] / d["median_ms"], 3)
    save()
    if "fig5_6" in model_figs:
        plot_fig5_6(results["fig5_6"], out("fig5_6") + ".png")
    if "fig8" in model_figs:
        plot_fig8(results["fig8"], out("fig8") + ".png")
    if "fig9" in model_figs:
        plot_stacked(results["fig9"], [f"{c}_GiB" for c in CATEGORIES] + ["activations_GiB"], CATEGORIES + ["activations"],
                     out("fig9") + ".png", "Fig. 9: memory (GiB): parameters by part, activations at one batch", "GiB")
    if "fig10" in model_figs:
        plot_stacked(results["fig10"], [f"{k}_ms" for k in PHASES], PHASES, out("fig10") + ".png",
                     "Fig. 10: latency breakdown of one call (total on top)", "% of the call", shares=True, unit="ms")


if __name__ == "__main__":
    main()
