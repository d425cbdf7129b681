"""Plot the benchmark JSON results in ``benchmarks/results/`` as PNG files next to them.

Writes, for whichever inputs exist:

* ``moe_layer_h200.png`` / ``moe_layer_2xh200.png``: one row per expert shape (E x d x f); left, forward
  time of one MoE layer vs tokens per GPU with the roofline floor dashed; right, peak activation memory.
* ``e2e_throughput.png``: end-to-end tokens/s vs batch tokens for lm-eval (E=128 on 1x and 2x H200,
  E=512 on 1x), mt-encoder and mt-generate (1x and 2x H200, expert parallel on 2).

Out-of-memory points (measured, or predicted and skipped) are marked with an 'x' at the top of the axis.

Usage: python benchmarks/plot_results.py [--results-dir benchmarks/results]
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

POLICIES = {  # policy key -> (legend label, colour, marker)
    "static-0.25": ("static, eval capacity 0.25", "tab:blue", "o"),
    "static-1.0": ("static, capacity 1.0", "tab:orange", "s"),
    "dynamic": ("dynamic", "tab:green", "^"),
    "dynamic-graph": ("dynamic in a CUDA graph", "tab:purple", "v"),
}


def load(path):
    with open(path) as fh:
        return json.load(fh)


def fmt_tokens(x, _pos=None):
    return f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"


def setup_axis(ax, xlabel, ylabel, title):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(fmt_tokens))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="y", alpha=0.1)


def plot_policies(ax, rows, xkey, ykey):
    """One line per policy; OOM rows become an 'x' near the top of the axis, labelled "OOM"."""
    ys, ooms = [], {}
    for policy, (label, color, marker) in POLICIES.items():
        prow = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r[xkey])
        pts = [(r[xkey], r[ykey]) for r in prow if not r.get("oom") and ykey in r]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
            ys += [y for _, y in pts]
        for r in prow:
            if r.get("oom"):
                ooms.setdefault(r[xkey], []).append(color)
    if ys:  # leave headroom (log scale) above the data for the OOM marks
        ax.set_ylim(min(ys) / 2, max(ys) * 6)
    trans = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    for x, colors in ooms.items():
        for j, color in enumerate(colors):  # spread coincident OOM marks of several policies along x
            xj = x * 2 ** (0.15 * (j - (len(colors) - 1) / 2))
            ax.plot([xj], [0.9], marker="x", color=color, markersize=9, mew=2, transform=trans, clip_on=False)
        ax.text(x, 0.95, "OOM", transform=trans, ha="center", va="bottom", fontsize=8, color="tab:red")
    return ys


def legend_on_top(fig, ax):
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.96), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.935))


def plot_moe_layer(path, out):
    data = load(path)
    rows = data["rows"]
    gpus = data.get("run", {}).get("gpus", 1)
    shapes = sorted({(r["E"], r["d"], r["f"]) for r in rows})
    comm = any("all_to_all_share" in r for r in rows)  # expert parallel: a third panel, all-to-all share
    ncols = 3 if comm else 2
    fig, axes = plt.subplots(len(shapes), ncols, figsize=(6 * ncols, 4.2 * len(shapes)), squeeze=False)
    for (E, d, f), (ax_t, ax_m, *ax_c) in zip(shapes, axes):
        srows = [r for r in rows if (r["E"], r["d"], r["f"]) == (E, d, f)]
        shape = f"E={E} experts x d={d} x f={f}"
        setup_axis(ax_t, "tokens per GPU", "forward time per MoE layer [ms]", f"MoE layer time, {shape}")
        setup_axis(ax_m, "tokens per GPU", "peak activation memory per GPU [MiB]", f"MoE layer peak activation memory, {shape}")
        ys = plot_policies(ax_t, srows, "tokens_per_gpu", "median_ms")
        floor = sorted({(r["tokens_per_gpu"], r["floor_ms"]) for r in srows if "floor_ms" in r})
        if floor:
            ax_t.plot(*zip(*floor), "k--", label="roofline floor: max(bf16 matmul time, expert weight read time)")
            ax_t.set_ylim(min(min(ys, default=1), min(y for _, y in floor)) / 2, ax_t.get_ylim()[1])
        plot_policies(ax_m, srows, "tokens_per_gpu", "peak_activation_MiB")
        if ax_c:
            setup_axis(ax_c[0], "tokens per GPU", "all-to-all time / layer time", f"all-to-all share, {shape}")
            ax_c[0].set_yscale("linear")
            plot_policies(ax_c[0], srows, "tokens_per_gpu", "all_to_all_share")
            ax_c[0].set_ylim(0, 1)
    dev = data.get("run", {}).get("device", "GPU")
    fig.suptitle(f"MoE layer forward, {gpus}x {dev}" + (" (expert parallel)" if gpus > 1 else "") + ", median of repeats")
    legend_on_top(fig, axes[0][0])
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_e2e(results_dir, out):
    def rows_of(name, workload):
        path = os.path.join(results_dir, name)
        if not os.path.exists(path):
            return []
        rows = []
        for r in load(path)["rows"]:
            if r["workload"] != workload:
                continue
            if str(r.get("skipped", "")).startswith("predicted out of memory"):
                r = dict(r, oom=True)  # predicted and skipped: drawn like a measured OOM
            elif "skipped" in r:
                continue
            rows.append(r)
        return rows

    panels = [
        ("lm-eval (language model scoring), E=128, 1x H200", rows_of("e2e_lm_h200.json", "lm-eval")),
        ("lm-eval, E=128, 2x H200 expert parallel\n(batch and tokens/s per GPU)", rows_of("e2e_lm_2xh200.json", "lm-eval")),
        ("lm-eval, E=512, 1x H200", rows_of("e2e_lm512_h200.json", "lm-eval")),
        ("mt-encoder (translation encoder forward), 1x H200", rows_of("e2e_mt_h200.json", "mt-encoder")),
        ("mt-encoder, 2x H200 expert parallel (per GPU)", rows_of("e2e_mt_2xh200.json", "mt-encoder")),
        ("mt-generate (beam 4, 32 target tokens), 1x H200", rows_of("e2e_mt_h200.json", "mt-generate")),
        ("mt-generate, 2x H200 expert parallel (per GPU)", rows_of("e2e_mt_2xh200.json", "mt-generate")),
    ]
    panels = [p for p in panels if p[1]]
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows), squeeze=False)
    for ax, (title, rows) in zip(axes.flat, panels):
        setup_axis(ax, "batch size [tokens per GPU]", "throughput [tokens/s]", title)
        plot_policies(ax, rows, "batch_tokens", "tokens_per_s")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("End-to-end inference throughput by MoE gating policy (x = out of memory)")
    legend_on_top(fig, max(axes.flat, key=lambda a: len(a.get_legend_handles_labels()[1])))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    parser.add_argument("--results-dir", default=default_dir, help="folder with the JSON results; PNGs are written there")
    args = parser.parse_args()
    written = []
    for name in ("moe_layer_h200", "moe_layer_2xh200"):
        path = os.path.join(args.results_dir, name + ".json")
        if os.path.exists(path):
            written.append(plot_moe_layer(path, os.path.join(args.results_dir, name + ".png")))
    written.append(plot_e2e(args.results_dir, os.path.join(args.results_dir, "e2e_throughput.png")))
    for path in written:
        print("wrote", path)


if __name__ == "__main__":
    main()
