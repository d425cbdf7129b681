"""The main job's results page: a Markdown report and a tokens-per-expert heat map (PNG).

``write_report(results, out_dir, command)`` writes ``report.md`` and
``tokens_per_expert.png`` next to ``results.json``: the BLEU/chrF and perplexity tables with
the MoE columns (tokens/s, dropped/routed top-k choices), and one heat-map row per evaluated
set and MoE layer whose cells are the share (%) of that layer's top-k choices each expert
processed (the ``tokens_per_expert`` counts of the JSON, which ``--moe-stats-json`` records).
"""

import os
from typing import Dict, List, Optional, Tuple

LAYER_PREFIXES = (("encoder.layers.", "enc "), ("decoder.layers.", "dec "))


def _layer_label(name: str) -> str:
    """'decoder.layers.3.moe_layer' -> 'dec 3'."""
    name = name.removesuffix(".moe_layer")
    for prefix, short in LAYER_PREFIXES:
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name


def heatmap_rows(results: dict) -> Tuple[List[str], List[List[float]]]:
    """Row labels and rows of per-expert shares (percent of the layer's routed top-k choices).

    Rows are padded with NaN to the largest expert count; a layer that routed nothing is a row of 0.
    """
    labels, rows = [], []
    for section in ("translation", "language_model"):
        for name, r in results.get(section, {}).items():
            for layer, counts in r.get("tokens_per_expert", {}).items():
                total = sum(counts)
                labels.append(f"{name} · {_layer_label(layer)}")
                rows.append([100.0 * c / total if total else 0.0 for c in counts])
    width = max((len(r) for r in rows), default=0)
    rows = [r + [float("nan")] * (width - len(r)) for r in rows]
    return labels, rows


def write_heatmap(results: dict, path: str) -> Optional[str]:
    """Write the tokens-per-expert heat map to ``path`` (PNG); None if no set has MoE layers."""
    labels, rows = heatmap_rows(results)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * len(rows[0]), 1.0 + 0.3 * len(rows)))
    image = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(len(rows[0])), [str(i) for i in range(len(rows[0]))], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(f"share of each MoE layer's top-k choices per expert ({results.get('moe_gating', '')} gating)", fontsize=9)
    fig.colorbar(image, ax=ax, label="% of the layer's choices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moe_cells(r: dict) -> str:
    if "moe_routed" not in r:
        return "no MoE layer | | "
    dropped, routed = r["moe_dropped"], r["moe_routed"]
    pct = 100.0 * dropped / routed if routed else 0.0
    rate = r["moe_tokens_per_s"]
    return f"{rate if rate is not None else 'n/a'} | {dropped:,} / {routed:,} ({pct:.1f}%) | "


def markdown(results: dict, command: str, heatmap: Optional[str]) -> str:
    """The report's Markdown text."""
    lines = ["# MoE evaluation report", "", f"Command: `{command}`", "",
             f"Gating: `{results.get('moe_gating')}`; total {results.get('seconds')} s.", ""]
    mt: Dict[str, dict] = results.get("translation", {})
    if mt:
        lines += ["## Translation (sacreBLEU)", "",
                  "| set | BLEU | chrF | sentences | MoE tokens/s | dropped / routed choices | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in mt.items():
            lines.append(f"| {name} | **{r['bleu']:.2f}** | {r.get('chrf', float('nan')):.2f} | {r['sentences']:,} | "
                         f"{_moe_cells(r)}{r['seconds']} |")
        for key, metric in (("signature", "BLEU"), ("chrf_signature", "chrF")):
            signatures = sorted({r[key] for r in mt.values() if key in r})
            lines += [""] + [f"{metric} signature: `{s}`" for s in signatures]
        lines.append("")
    lm: Dict[str, dict] = results.get("language_model", {})
    if lm:
        lines += ["## Language model (fairseq-eval-lm)", "",
                  "| set | perplexity | tokens scored | MoE tokens/s | dropped / routed choices | seconds |",
                  "|---|---|---|---|---|---|"]
        for name, r in lm.items():
            lines.append(f"| {name} | **{r['perplexity']:.2f}** | {r['tokens']:,} | {_moe_cells(r)}{r['seconds']} |")
        lines.append("")
    if heatmap:
        lines += ["## Tokens per expert", "",
                  "Share of each MoE layer's top-k choices that each expert processed (a balanced layer is one flat colour):",
                  "", f"![tokens per expert]({os.path.basename(heatmap)})", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str, command: str) -> str:
    """Write ``report.md`` (and ``tokens_per_expert.png``) into ``out_dir``; returns the report's path.

    Both are written under temporary names and moved into place, so a reader never sees half a file.

    Raises:
        OSError: the folder cannot be written (full, read-only).
    """
    png = os.path.join(out_dir, "tokens_per_expert.png")
    tmp_png = png + f".{os.getpid()}.tmp.png"
    made = write_heatmap(results, tmp_png)
    if made:
        os.replace(tmp_png, png)
    report = os.path.join(out_dir, "report.md")
    tmp = report + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown(results, command, png if made else None))
    os.replace(tmp, report)
    return report
