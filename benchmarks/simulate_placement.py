"""Simulated expert load balance of placement policies on recorded routing traces (paper Fig. 14/15).

For every model (the bundled LM: one trace per evaluation set; the bundled MT model: one trace
per target language) and every trace X of it, each policy is planned on data it is then not
evaluated on, in two ways: ``same_set`` -- planned on the first half of X's MoE-layer calls,
evaluated on the second half (other sentences of the same set / target language: the case of a
deployment planning on its own recent traffic); ``other_sets`` -- planned on the model's other
traces, evaluated on all of X (another domain / target language). G GPUs with
S = ceil(E / G) and S + 1 slots per GPU.
The measure is the per-batch max/mean GPU load (``step_max_over_mean`` of
:func:`fairseq_moe_infer.placement_planner.load_ratios`: the slowest GPU's tokens summed over the
steps of all MoE layers of a stack, over the balanced time), per stack (LM decoder, MT encoder,
MT decoder). Time is taken as proportional to tokens (the paper's assumption).

``greedy+ls`` / ``anti_correlation+ls``: those plans refined by the swap local search on the
planning data (:func:`~fairseq_moe_infer.placement_planner.refine_by_swaps`).

Also, per trace and layer, greedy (and greedy + local search) planned on that trace itself against the best placement
without replication (:func:`~fairseq_moe_infer.placement_planner.best_balance_bound`, exact
integer program or a lower bound), for the "greedy within 2% of the best" goal.

    python benchmarks/simulate_placement.py --traces benchmarks/results/traces \\
        --out benchmarks/results/placement_sim.json

E = 16 in the bundled models, so G = 64 runs with 1 and 2 slots per GPU: every expert then has
4 or 8 replicas (contiguous: expert ``i mod 16`` on GPU i).

``--model NAME=GLOB`` (repeatable) simulates the traces matching GLOB as model NAME instead of the
``--traces`` folder's models (one trace per label, the file name without ``.npz``), e.g. the 64- and
128-expert MT models' traces, with ``--gpus``, ``--policies`` and ``--search-time-s`` (the local
search's limit per layer) to keep the run short:

    python benchmarks/simulate_placement.py --model 'mt_moe64=benchmarks/results/traces/mt_moe64/*_b16.npz' \\
        --model 'mt_moe128=benchmarks/results/traces/mt_moe128/*_b16.npz' --gpus 2 4 8 \\
        --policies contiguous greedy anti_correlation replicate greedy+ls --search-time-s 2 --bound-time-s 3 \\
        --out benchmarks/results/placement_sim_moe64_moe128.json
"""

import argparse
import glob
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_info, write_json  # noqa: E402
from fairseq_moe_infer import placement_planner as pp  # noqa: E402

GPUS = (2, 4, 8, 16, 64)
POLICIES = ("contiguous", "greedy", "anti_correlation", "replicate", "greedy+ls", "anti_correlation+ls")


def _plan(policy: str, counts: dict, g: int, s: int, search_time_s: float = pp.LOCAL_SEARCH_S):
    """``greedy+ls``: greedy refined by the swap local search (placement_planner.refine_by_swaps)."""
    base, _, ls = policy.partition("+")
    return pp.plan_placement(base, counts, g, s, local_search=bool(ls), search_time_s=search_time_s)


def _models(folder: str) -> dict:
    """model -> {trace label -> path}: files ``lm_<set>.npz`` and ``mt_<pair>.npz``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.npz"))):
        name = os.path.basename(path)[:-4]
        model, _, label = name.partition("_")
        if model in ("lm", "mt") and label:
            out.setdefault(model, {})[label] = path
    return out


def _named_models(specs) -> dict:
    """``--model NAME=GLOB`` arguments -> {NAME: {file name without .npz -> path}}."""
    out = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        paths = sorted(glob.glob(pattern))
        if not sep or not name or not paths:
            raise SystemExit(f"simulate_placement.py: error: --model {spec}: want NAME=GLOB matching .npz traces")
        out[name] = {os.path.basename(p)[:-4]: p for p in paths}
    return out


def _concat(parts):
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _stack_ratio(placement, counts) -> dict:
    r = pp.placement_ratios(placement, counts)
    return {k: v["step_max_over_mean"] for k, v in r.items() if k != "layers"}


def simulate(models: dict, bound_time_s: float, gpus=GPUS, policies=POLICIES, search_time_s: float = pp.LOCAL_SEARCH_S) -> dict:
    results = {"num_experts": {}, "held_out": [], "greedy_vs_best": []}
    for model, traces in models.items():
        counts = {label: pp.trace_layer_counts([path]) for label, path in traces.items()}
        e = next(iter(next(iter(counts.values())).values())).shape[1]
        results["num_experts"][model] = e
        for label in traces:
            others = [other for other in traces if other != label] or [label]
            halves = {n: c.shape[0] // 2 for n, c in counts[label].items()}
            splits = {
                "same_set": ({n: c[: halves[n]] for n, c in counts[label].items()},
                             {n: c[halves[n]:] for n, c in counts[label].items()}, [f"{label} first half"]),
                "other_sets": (_concat([counts[o] for o in others]), counts[label], others),
            }
            for mode, (train, test, plan_on) in splits.items():
                for g in gpus:
                    base = -(-e // g)
                    for s in (base, base + 1):
                        for policy in policies:
                            placement = _plan(policy, train, g, s, search_time_s)
                            results["held_out"].append({
                                "model": model, "mode": mode, "held_out": label, "planned_on": plan_on, "gpus": g,
                                "slots": s, "policy": policy, "held_out_ratio": _stack_ratio(placement, test),
                                "planned_on_ratio": _stack_ratio(placement, train)})
            for g in gpus:
                if g > e:
                    continue
                for name, c in counts[label].items():
                    t0 = time.time()
                    def ratio(plan):
                        return pp.load_ratios(pp.gpu_loads(c, plan, g))["step_max_over_mean"]

                    greedy = ratio(pp.plan_layer("greedy", c, g, e // g))
                    refined = ratio(pp.plan_layer("greedy", c, g, e // g, local_search=True, search_time_s=search_time_s))
                    b = pp.best_balance_bound(c, g, e // g, time_limit_s=bound_time_s)
                    results["greedy_vs_best"].append({
                        "model": model, "trace": label, "layer": name, "gpus": g, "slots": e // g, "greedy": greedy,
                        "greedy_local_search": refined, **b, "greedy_over_bound": greedy / b["bound"],
                        "greedy_local_search_over_bound": refined / b["bound"], "solve_s": round(time.time() - t0, 1)})
                    print(f"{model} {label} {name} G={g}: greedy {greedy:.3f}, + local search {refined:.3f}, best "
                          f"{'=' if b['exact'] else '>='} {b['bound']:.3f}", flush=True)
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], stack) for r in results["held_out"] for stack in r["held_out_ratio"]})
    gpus = sorted({r["gpus"] for r in results["held_out"]})
    policies = [p for p in POLICIES if any(r["policy"] == p for r in results["held_out"])]
    experts = results.get("num_experts", {})
    modes = ("same_set", "other_sets")
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(4.2 * len(panels), 3.4 * len(modes)), squeeze=False)
    colors = {"contiguous": "tab:gray", "greedy": "tab:blue", "anti_correlation": "tab:green", "replicate": "tab:red",
              "greedy+ls": "tab:purple", "anti_correlation+ls": "tab:olive"}
    for (row, mode), (col, (model, stack)) in ((m, c) for m in enumerate(modes) for c in enumerate(panels)):
        ax = axes[row][col]
        for spare, style in ((0, "-"), (1, "--")):
            for policy in policies:
                if spare and policy == "greedy":
                    continue  # with spare slots greedy is replicate's plan
                xs, ys = [], []
                for g in gpus:
                    rows = [r for r in results["held_out"] if r["model"] == model and r["gpus"] == g and r["mode"] == mode
                            and r["policy"] == policy and r["slots"] == -(-experts.get(model, 16) // g) + spare]
                    if rows:
                        xs.append(g)
                        ys.append(max(r["held_out_ratio"][stack] for r in rows))
                ax.plot(xs, ys, style, marker="o", color=colors[policy],
                        label=f"{policy}, S={'E/G+1' if spare else 'E/G'}")
        ax.axhline(1.10, color="black", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.set_title(f"{model.upper()} {stack}, planned on {mode.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("GPUs G")
        ax.set_ylabel("worst held-out max/mean GPU load")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default=os.path.join("benchmarks", "results", "traces"),
                   help="folder of lm_<set>.npz / mt_<pair>.npz routing traces")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "placement_sim.json"))
    p.add_argument("--bound-time-s", type=float, default=5.0, help="integer-program time limit per layer and G")
    p.add_argument("--model", action="append", default=[], metavar="NAME=GLOB",
                   help="simulate the traces matching GLOB as model NAME (repeatable) instead of the --traces folder's")
    p.add_argument("--gpus", type=int, nargs="+", default=list(GPUS), help="GPU counts G")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--search-time-s", type=float, default=pp.LOCAL_SEARCH_S,
                   help="local search's time limit per layer (the +ls policies)")
    a = p.parse_args(argv)
    if any(g < 1 for g in a.gpus) or not (a.search_time_s > 0 and a.bound_time_s > 0):
        raise SystemExit("simulate_placement.py: error: --gpus must be >= 1 and the time limits > 0")
    models = _named_models(a.model) if a.model else _models(a.traces)
    if not models:
        raise SystemExit(f"simulate_placement.py: error: no lm_*.npz / mt_*.npz traces in {a.traces}")
    results = simulate(models, a.bound_time_s, a.gpus, a.policies, a.search_time_s)
    write_json(a.out, {**run_info(argv), "traces": {m: {k: os.path.basename(v) for k, v in t.items()}
                                                    for m, t in models.items()}, **results})
    plot(results, a.out[:-5] + ".png")
    print(f"wrote {a.out} and {a.out[:-5]}.png")


if __name__ == "__main__":
    main()
