#!/usr/bin/env python3
"""Trace-driven simulation of expert buffering: miss rate against cache size K for every eviction policy.

Reads routing traces recorded with ``--moe-record-trace`` (``fairseq_moe_infer/trace.py``) and replays
each MoE layer's lookups (the experts that received tokens, call by call) through the same
:class:`~fairseq_moe_infer.moe.eviction.SlotCache` and policy classes the buffered expert store
uses (``lifo``, ``lru``, ``fifo``, ``lfu`` and the offline optimum ``belady``), for every K from 1
to E (Huang et al. 2024, Fig. 12). Layers are grouped into LM scoring (a ``lm*`` trace), the MT
encoder and the MT decoder (the ``encoder.`` / ``decoder.`` layers of an ``mt*`` trace).

Per group, policy and K it reports the miss rate (misses / lookups, all calls of all layers), and
per batch (a batch starts at each call of the model's first MoE layer) the average and the worst
miss rate over batches and layers; plus, per group and K, and per trace, group and K
(``gap_to_belady_per_trace``), the gap in points between the best online policy and Belady. Traces
of one run must have the same expert count (simulate a 64- and a 128-expert model in two runs).
Output: ``--out`` JSON (with the command and git commit) and a PNG beside it.

With ``--prefetch`` it compares prefetch predictors instead (``--moe-prefetch``,
``fairseq_moe_infer/moe/prefetch.py``), replayed through the same ``SlotCache.prefetch``:
``none``; ``previous-step`` (after each call of a layer, the K experts of that call with the most
tokens: exactly what the store does on one rank); and ``next-call`` (an oracle: all the next
call's experts, most tokens first: the bound of any predictor, e.g. of ``gate``, which needs
hidden states that traces do not hold). Per group, predictor, policy and K: misses, prefetches
issued, prefetch hits, unused prefetches, experts copied in (misses + prefetches), and the misses
and copies saved against ``none`` (negative: more copied than without prefetching).

Example (the committed results; traces of the bundled models, see README "Expert buffering"):
    python scripts/simulate_buffering.py benchmarks/results/traces/*.npz \\
        --out benchmarks/results/buffering_simulation.json
    python scripts/simulate_buffering.py benchmarks/results/traces/*.npz --prefetch none previous-step next-call \\
        --policies lifo lru lfu belady --sizes 2 4 8 12 --out benchmarks/results/prefetch_simulation.json
"""

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fairseq_moe_infer.moe.eviction import POLICIES, SlotCache, build_policy  # noqa: E402
from fairseq_moe_infer.moe.prefetch import PreviousStep, ranked_experts  # noqa: E402
from fairseq_moe_infer.trace import RoutingTrace, TraceError, read_run_traces  # noqa: E402

ONLINE = [p for p in sorted(POLICIES) if p != "belady"]
SIM_PREDICTORS = ("none", "previous-step", "next-call")


def group_of(trace_name: str, layer_name: str) -> str:
    """``LM`` for a language-model trace, else ``MT encoder`` / ``MT decoder`` by the layer's stack."""
    if os.path.basename(trace_name).startswith("lm"):
        return "LM"
    return "MT encoder" if layer_name.startswith("encoder.") else "MT decoder"


def read_run(path: str, allow_incomplete: bool = False) -> RoutingTrace:
    """The trace at ``path``; of an expert-parallel run, with its ranks' files (``PATH.rank<r>``) merged
    call by call (as ``plan_placement.py`` reads them): call i holds every rank's tokens of the ranks'
    i-th MoE-layer calls, so its lookups are the experts any rank's tokens used (those a rank's store
    looks up among its own experts). Before, rank 0's tokens alone were simulated, without a word.

    Raises:
        TraceError: unreadable rank files, or ranks that recorded other call sequences."""
    ranks = read_run_traces(path, allow_incomplete=allow_incomplete)
    t = ranks[0]
    if t.world_size == 1:
        return t
    if any(not np.array_equal(r.call_layer, t.call_layer) for r in ranks):
        raise TraceError(f"the ranks of {path} recorded other MoE-layer call sequences; record the run again")
    choices = [r.call_choices(i) for i in range(t.num_calls) for r in ranks]
    return RoutingTrace(t.num_experts, t.k, t.layer_names, t.call_layer, sum(r.call_tokens for r in ranks),
                        np.concatenate(choices) if choices else t.choices, complete=all(r.complete for r in ranks),
                        stopped_by=t.stopped_by)


def cache_sizes(sizes, num_experts: int):
    """The cache sizes K to simulate: ``sizes`` (each in [1, E]) or 1..E; else one line (SystemExit)."""
    bad = [K for K in sizes or [] if not 1 <= K <= num_experts]
    if bad:
        raise SystemExit(f"simulate_buffering.py: error: --sizes {bad[0]}: a cache size K must be in [1, {num_experts}], "
                         f"the traces' experts per layer")
    return sizes or list(range(1, num_experts + 1))


def layer_lookups(trace):
    """Per layer: the list of lookups (sorted expert ids with tokens) and the batch index of each call."""
    out = {}
    batch_of_call, batch = [], -1
    for layer in trace.call_layer:
        if layer == 0:
            batch += 1
        batch_of_call.append(max(batch, 0))
    for i, name in enumerate(trace.layer_names):
        calls = trace.calls_of(i)
        active = trace.active(i)
        out[name] = ([row.nonzero()[0].tolist() for row in active], [batch_of_call[c] for c in calls])
    return out


def simulate(lookups, K: int, policy: str, num_experts: int):
    """Replay ``lookups`` through a K-slot cache; returns per-call (lookups, misses)."""
    cache = SlotCache(num_experts, K, build_policy(policy, num_experts, lookups if policy == "belady" else None))
    per_call = []
    for active in lookups:
        before = cache.misses
        cache.lookup(active)
        per_call.append((len(active), cache.misses - before))
    return per_call


def simulate_prefetch(lookups, counts, K: int, policy: str, num_experts: int, predictor: str) -> dict:
    """Replay one layer's ``lookups`` through a K-slot cache with prefetching by ``predictor``
    (:data:`SIM_PREDICTORS`); ``counts`` [calls, E] are the tokens per expert of each call.

    Returns:
        dict of counts: ``lookups``, ``misses``, ``prefetches``, ``prefetch_hits``, ``prefetch_unused``
        (evicted before use, or never used), ``copies`` (misses + prefetches: experts copied in).
    """
    cache = SlotCache(num_experts, K, build_policy(policy, num_experts, lookups if policy == "belady" else None))
    for t, active in enumerate(lookups):
        cache.lookup(active)
        if predictor == "previous-step":
            cache.prefetch(PreviousStep.predict(counts[t].tolist(), K))
        elif predictor == "next-call" and t + 1 < len(lookups):
            cache.prefetch(ranked_experts(counts[t + 1].tolist()))
        elif predictor not in SIM_PREDICTORS:
            raise ValueError(f"unknown predictor '{predictor}'; choose one of {', '.join(SIM_PREDICTORS)}")
    return {"lookups": cache.lookups, "misses": cache.misses, "prefetches": cache.prefetches,
            "prefetch_hits": cache.prefetch_hits,
            "prefetch_unused": cache.prefetch_evicted_unused + len(cache.prefetch_pending),
            "copies": cache.misses + cache.prefetches}


def run_prefetch(paths, policies, sizes, predictors, allow_incomplete=False):
    """Prefetch predictors against no prefetching, per group (see the module docstring)."""
    traces = [(p, read_run(p, allow_incomplete)) for p in paths]
    num_experts = traces[0][1].num_experts
    if any(t.num_experts != num_experts for _, t in traces):
        raise SystemExit("simulate_buffering.py: error: the traces have different expert counts")
    ks = cache_sizes(sizes, num_experts)
    keys = ("lookups", "misses", "prefetches", "prefetch_hits", "prefetch_unused", "copies")
    acc = defaultdict(lambda: {k: 0 for k in keys})
    for path, t in traces:
        for name, (lookups, _) in layer_lookups(t).items():
            counts = t.expert_counts(name)
            group = group_of(path, name)
            for predictor in predictors:
                for policy in policies:
                    for K in ks:
                        r = simulate_prefetch(lookups, counts, K, policy, t.num_experts, predictor)
                        a = acc[(group, predictor, policy, K)]
                        for k in keys:
                            a[k] += r[k]
    groups = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for (group, predictor, policy, K), a in sorted(acc.items()):
        row = dict(a)
        row["miss_rate"] = round(a["misses"] / a["lookups"], 6) if a["lookups"] else None
        row["copies_per_lookup"] = round(a["copies"] / a["lookups"], 6) if a["lookups"] else None
        base = acc.get((group, "none", policy, K))
        if base is not None:
            row["misses_saved"] = base["misses"] - a["misses"]
            row["copies_saved"] = base["copies"] - a["copies"]
            saved = base["misses"] - a["misses"]
            row["miss_rate_points_saved"] = round(100 * saved / a["lookups"], 3) if a["lookups"] else None
        groups[group][predictor][policy][K] = row
    return {"num_experts": num_experts, "sizes": ks, "predictors": list(predictors), "policies": list(policies),
            "groups": {g: {p: dict(v) for p, v in t.items()} for g, t in groups.items()}}


def prefetch_markdown(res, policy="lifo") -> str:
    """README table: per group and K, miss rate (%) and experts copied per lookup for each predictor (one policy)."""
    preds = res["predictors"]
    lines = ["| group | K | " + " | ".join(f"{p} miss % (copies/lookup)" for p in preds) + " |",
             "|---" * (len(preds) + 2) + "|"]
    for g in sorted(res["groups"]):
        for K in res["sizes"]:
            cells = []
            for p in preds:
                r = res["groups"][g].get(p, {}).get(policy, {}).get(K)
                cells.append(f"{100 * r['miss_rate']:.1f} ({r['copies_per_lookup']:.2f})" if r else "")
            lines.append(f"| {g} | {K} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_prefetch(res, png, policy="lifo"):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(res["groups"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for p in res["predictors"]:
            table = res["groups"][g].get(p, {}).get(policy)
            if not table:
                continue
            ks = sorted(table)
            line, = ax.plot(ks, [100 * table[k]["miss_rate"] for k in ks], marker="o", ms=3, label=f"{p}: miss rate")
            ax.plot(ks, [100 * table[k]["copies_per_lookup"] for k in ks], ls="--", color=line.get_color(), lw=0.8,
                    label=f"{p}: copies per lookup")
        ax.set_title(f"{g}, {policy}: prefetch predictors")
        ax.set_xlabel("cache size K (experts per layer)")
        ax.set_ylabel("% of lookups")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run(paths, policies, sizes=None, allow_incomplete=False):
    results = defaultdict(lambda: defaultdict(dict))
    acc = defaultdict(lambda: defaultdict(lambda: {"lookups": 0, "misses": 0, "batch_rates": []}))
    per_trace = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # (trace, group) -> (policy, K) -> [lookups, misses]
    num_experts = None
    traces = []
    for path in paths:
        t = read_run(path, allow_incomplete)
        num_experts = num_experts or t.num_experts
        if t.num_experts != num_experts:
            raise SystemExit(f"simulate_buffering.py: error: {path} has {t.num_experts} experts, the others {num_experts}")
        traces.append((path, t))
    ks = cache_sizes(sizes, num_experts)
    per_layer = {}
    for path, t in traces:
        for name, (lookups, batches) in layer_lookups(t).items():
            group = group_of(path, name)
            for policy in policies:
                for K in ks:
                    per_call = simulate(lookups, K, policy, t.num_experts)
                    a = acc[group][(policy, K)]
                    n_look = sum(n for n, _ in per_call)
                    n_miss = sum(m for _, m in per_call)
                    a["lookups"] += n_look
                    a["misses"] += n_miss
                    pt = per_trace[(os.path.basename(path), group)][(policy, K)]
                    pt[0] += n_look
                    pt[1] += n_miss
                    by_batch = defaultdict(lambda: [0, 0])
                    for (n, m), b in zip(per_call, batches):
                        by_batch[b][0] += n
                        by_batch[b][1] += m
                    a["batch_rates"] += [m / n for n, m in by_batch.values() if n]
                    per_layer.setdefault(f"{os.path.basename(path)}:{name}", {}).setdefault(policy, {})[K] = \
                        round(n_miss / n_look, 6) if n_look else None
    for group, table in acc.items():
        for (policy, K), a in table.items():
            rates = a["batch_rates"]
            results[group][policy][K] = {
                "miss_rate": round(a["misses"] / a["lookups"], 6) if a["lookups"] else None,
                "batch_avg": round(sum(rates) / len(rates), 6) if rates else None,
                "batch_worst": round(max(rates), 6) if rates else None,
                "lookups": a["lookups"],
                "misses": a["misses"],
            }
    gaps, trace_gaps = {}, {}
    if "belady" in policies and all(p in policies for p in ONLINE):
        for group, table in results.items():
            gaps[group] = {K: gap_of({p: table[p][K]["miss_rate"] for p in table}) for K in ks}
        for (trace, group), table in sorted(per_trace.items()):
            trace_gaps.setdefault(trace, {})[group] = {
                K: gap_of({p: table[(p, K)][1] / table[(p, K)][0] for p in policies if table[(p, K)][0]}) for K in ks}
    return {"num_experts": num_experts, "sizes": ks, "groups": {g: dict(v) for g, v in results.items()},
            "gap_to_belady": gaps, "gap_to_belady_per_trace": trace_gaps, "per_layer_miss_rate": per_layer}


def gap_of(miss_rates: dict) -> dict:
    """The best online policy of ``miss_rates`` ({policy: miss rate in [0, 1]}, incl. ``belady``) and its
    gap to Belady in percentage points (``{"best_online": name, "gap_points": float}``; ``{}`` without lookups)."""
    if "belady" not in miss_rates or not all(p in miss_rates for p in ONLINE):
        return {}
    best = min(ONLINE, key=lambda p: miss_rates[p])
    return {"best_online": best, "gap_points": round(100 * (miss_rates[best] - miss_rates["belady"]), 3)}


def markdown_table(res, fractions=(8, 4, 2, 4 / 3)) -> str:
    """README table: miss rate (%) per group at K = E/8, E/4, E/2, 3E/4 for each policy (average per
    batch / worst batch in parentheses for lifo), and the best online policy's gap to Belady."""
    E = res["num_experts"]
    policies = sorted(next(iter(res["groups"].values())))
    lines = ["| group | K | " + " | ".join(policies) + " | lifo per batch avg (worst) | best online - belady |",
             "|---" * (len(policies) + 4) + "|"]
    for g in sorted(res["groups"]):
        t = res["groups"][g]
        for f in fractions:
            K = max(1, round(E / f))
            if K not in t[policies[0]]:
                continue
            cells = [f"{100 * t[p][K]['miss_rate']:.1f}" for p in policies]
            lifo = t.get("lifo", {}).get(K)
            per_batch = f"{100 * lifo['batch_avg']:.1f} ({100 * lifo['batch_worst']:.1f})" if lifo else ""
            gap = res["gap_to_belady"].get(g, {}).get(K, {})
            gap_cell = f"{gap['gap_points']:.2f} ({gap['best_online']})" if gap else ""
            lines.append(f"| {g} | {K} | " + " | ".join(cells) + f" | {per_batch} | {gap_cell} |")
    return "\n".join(lines)


def plot(res, png):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging setup leaves the root at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(res["groups"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for policy, table in sorted(res["groups"][g].items()):
            ks = sorted(table)
            line, = ax.plot(ks, [100 * table[k]["batch_avg"] for k in ks], marker="o", ms=3, label=f"{policy} (avg)")
            ax.plot(ks, [100 * table[k]["batch_worst"] for k in ks], ls="--", color=line.get_color(), lw=0.8)
        ax.set_title(f"{g}: miss rate per batch (dashed: worst)")
        ax.set_xlabel("cache size K (experts per layer)")
        ax.set_ylabel("miss rate (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", help="routing traces (.npz); names starting with 'lm' are LM traces")
    p.add_argument("--policies", nargs="+", default=sorted(POLICIES), choices=sorted(POLICIES))
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="cache sizes K (default 1..E)")
    p.add_argument("--prefetch", nargs="+", default=None, choices=SIM_PREDICTORS,
                   help="compare these prefetch predictors (none, previous-step, next-call oracle) instead")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="accept traces of interrupted runs (complete=false, e.g. stopped by SIGTERM)")
    p.add_argument("--out", required=True, help="JSON to write (a PNG beside it)")
    a = p.parse_args()
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        raise SystemExit(f"simulate_buffering.py: error: --out {a.out}: folder {os.path.dirname(os.path.abspath(a.out))} "
                         "does not exist; create it first")
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    head = {"command": " ".join(["python", "scripts/simulate_buffering.py"] + [os.path.relpath(t, REPO) for t in a.traces]
                                + sys.argv[1 + len(a.traces):]),
            "commit": commit, "traces": [os.path.relpath(t, REPO) for t in a.traces]}
    try:
        if a.prefetch:
            sim = run_prefetch(a.traces, a.policies, a.sizes, a.prefetch, a.allow_incomplete)
        else:
            sim = run(a.traces, a.policies, a.sizes, a.allow_incomplete)
    except TraceError as e:
        raise SystemExit(f"simulate_buffering.py: error: {e}")
    if a.prefetch:
        res = {**head, **sim}
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        plot_prefetch(res, os.path.splitext(a.out)[0] + ".png")
        print(prefetch_markdown(res), file=sys.stderr)
        return
    res = {**head, **sim}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.splitext(a.out)[0] + ".png")
    print(markdown_table(res), file=sys.stderr)
    for g, gaps in res["gap_to_belady"].items():
        K, worst = max(gaps.items(), key=lambda kv: kv[1].get("gap_points", -1))
        print(f"{g}: largest gap best-online vs belady {worst['gap_points']:.2f} points (K = {K})", file=sys.stderr)
    for trace, by_group in res["gap_to_belady_per_trace"].items():
        for g, gaps in by_group.items():
            K, worst = max(gaps.items(), key=lambda kv: kv[1].get("gap_points", -1))
            print(f"{trace} {g}: largest gap {worst['gap_points']:.2f} points (K = {K}, {worst['best_online']})",
                  file=sys.stderr)
    print(json.dumps({g: {p: {k: v["miss_rate"] for k, v in t.items()} for p, t in tbl.items()}
                      for g, tbl in res["groups"].items()}))


if __name__ == "__main__":
    main()
