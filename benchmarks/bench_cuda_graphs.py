#!/usr/bin/env python3
"""Decoding with the MoE layers replayed from CUDA graphs (``--moe-cuda-graph-max-tokens``) against eager.

Builds the NLLB-shaped MT model of ``bench_end_to_end.py`` (E=128, d=2048, f=8192, 12+12 layers,
MoE every 4th layer, bf16, random weights, dynamic gating) and times fairseq's
``SequenceGenerator`` (what ``fairseq-generate`` runs: beam 4, 64-token sources, exactly 32
generated tokens) at several sentences per batch, eager and with every MoE call of at most
``--max-tokens`` tokens replayed from a graph (decoder steps: sentences x beam tokens; the
encoder's calls are larger and stay eager). Reports ms per generated token (median of
``--repeat`` runs of each, alternating eager and graphs, after one warm-up each; CUDA events, fresh
random sources per batch size), the ratio
graphs / eager, the captured buckets, and whether both produced the same tokens.

Example (H200)::

    python benchmarks/bench_cuda_graphs.py --out benchmarks/results/cuda_graphs_generate_h200.json

``--device cpu --toy`` checks the script at a toy size (the padded path runs eagerly: no graphs).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_end_to_end as e2e  # noqa: E402
from benchmarks.common import median_time_s, run_info, write_json  # noqa: E402

MODES = ("eager", "graphs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--max-tokens", type=int, default=256, help="--moe-cuda-graph-max-tokens")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=12, help="layers per side")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--toy", action="store_true", help="d=64, f=128 (a CPU check of the script)")
    p.add_argument("--max-minutes", type=float, default=4.0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_moe_infer.inference import configure_cuda_graphs
    from fairseq_moe_infer.moe import moe_layers

    deadline = time.time() + 60 * a.max_minutes
    if a.device == "cpu":
        e2e.DEVICE[0] = "cpu"
    if a.toy:
        e2e.SHAPES["mt"].update(d=64, f=128, heads=2, vocab=1000, seq=8, out_len=4)
    s = e2e.SHAPES["mt"]
    model, task = e2e.build("mt", a.experts, a.layers)
    e2e.set_policy(model, "dynamic")
    device = torch.device(e2e.DEVICE[0])
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=s["beam"], max_len_a=0, max_len_b=s["out_len"],
                            min_len=s["out_len"])
    capture = device.type == "cuda"
    rows = []

    def save():
        write_json(a.out, {"benchmark": "cuda_graphs_generate", "run": run_info(),
                           "model": {"experts": a.experts, "layers_per_side": a.layers, "d": s["d"], "f": s["f"],
                                     "beam": s["beam"], "source_tokens": s["seq"], "generated_tokens": s["out_len"]},
                           "max_tokens": a.max_tokens, "rows": rows})

    for b in a.sentences:
        if time.time() > deadline:
            rows.append({"sentences": b, "skipped": "time budget"})
            continue
        src = e2e.random_tokens(b, s["seq"], s["vocab"], seed=b)
        sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((b,), s["seq"], device=device)}}
        configure_cuda_graphs(model, a.max_tokens, capture=capture)
        layers = moe_layers(model)
        graphs = [m.graphs for m in layers]

        def use(mode):
            for m, g in zip(layers, graphs):
                m.graphs = g if mode == "graphs" else None

        def fn():
            with torch.no_grad():
                return gen.generate([model], sample)

        result = {}
        for mode in MODES:  # one warm-up run each (the graphs are captured here)
            use(mode)
            result[mode] = {"hyps": [h[0]["tokens"].tolist() for h in fn()], "ms": []}
        for _ in range(a.repeat):  # alternating, so that drift of the machine hits both alike
            for mode in MODES:
                use(mode)
                result[mode]["ms"].append(1000 * median_time_s(fn, device, warmup=0, repeat=1))
        for mode in MODES:
            result[mode]["ms_per_token"] = round(statistics.median(result[mode]["ms"]) / s["out_len"], 3)
        result["graphs"]["buckets"] = graphs[-1].buckets
        same = sum(x == y for x, y in zip(result["eager"]["hyps"], result["graphs"]["hyps"]))
        rows.append({"sentences": b, "tokens_per_decoder_step": b * s["beam"],
                     "eager_ms_per_token": result["eager"]["ms_per_token"],
                     "graphs_ms_per_token": result["graphs"]["ms_per_token"],
                     "graphs_over_eager": round(result["graphs"]["ms_per_token"] / result["eager"]["ms_per_token"], 3),
                     "buckets_captured": result["graphs"]["buckets"], "same_best_hypothesis": f"{same}/{b}",
                     "runs_ms": {m: [round(t, 2) for t in result[m]["ms"]] for m in MODES}})
        print(rows[-1], flush=True)
        save()
    configure_cuda_graphs(model, 0)
    save()


if __name__ == "__main__":
    main()
