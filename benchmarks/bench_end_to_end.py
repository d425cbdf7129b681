#!/usr/bin/env python3
"""End-to-end throughput of paper-shaped MoE models through fairseq's own inference code.

The models are built by the plugin's fairseq task (``task.build_model``, as
``fairseq-eval-lm`` / ``fairseq-generate`` do) with random bf16 weights (no
checkpoint I/O), then timed on the exact code paths of the stock tools:

* ``lm``: ``fairseq.sequence_scorer.SequenceScorer`` (what ``fairseq-eval-lm``
  runs per batch) on blocks of 512 tokens -- like fairseq's MoE language models
  (Artetxe et al. 2021): 24 layers, d=1024, FFN 4096, 16 heads, MoE every 2nd
  layer, top-2, E experts, vocabulary 51,200;
* ``mt-encoder``: the encoder forward over source batches (encoder-heavy work)
  and ``mt-generate``: ``fairseq.sequence_generator.SequenceGenerator`` (what
  ``fairseq-generate`` runs), beam 4, 64-token sources and exactly 32 generated
  tokens -- shaped like NLLB-MoE: d=2048, FFN 8192, 16 heads, MoE every 4th
  layer, E=128, top-2, 12+12 layers, vocabulary 32k.

For each gating policy (static with eval capacity fraction 0.25 and 1.0,
dynamic) the batch grows by doubling until it runs out of memory; the report is
tokens/s per batch, the maximum per policy, peak memory and the ratio of
maximum throughputs dynamic / static.

Example:
    python benchmarks/bench_end_to_end.py --model lm --out benchmarks/results/e2e_lm_h200.json
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    any_rank,
    exit_after_oom_under_expert_parallelism,
    free_memory,
    init_distributed,
    log_row,
    measure_ceilings,
    moe_rows_per_gpu,
    oom_marks,
    reset_moe_counters,
    run_info,
    time_cuda,
    write_json,
)

USER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fairseq_moe_infer")
POLICIES = {"static-0.25": ("static", 0.25), "static-1.0": ("static", 1.0), "dynamic": ("dynamic", 0.25)}
# the two paper-like models (top-2); "seq" is the LM block / the MT source length; mt-generate: beam and
# generated tokens per sentence. model_argv, the runners and flops_per_token all read these.
SHAPES = {"lm": {"d": 1024, "f": 4096, "heads": 16, "moe_every": 2, "seq": 512, "vocab": 51200},
          "mt": {"d": 2048, "f": 8192, "heads": 16, "moe_every": 4, "seq": 64, "vocab": 32000, "beam": 4, "out_len": 32}}


def model_argv(kind: str, experts: int, layers: int, data: str) -> list:
    s = SHAPES[kind]
    moe = ["--moe-expert-count", str(experts), "--moe-freq", str(s["moe_every"])]
    if kind == "lm":
        return [data, "--task", "moe_language_modeling", "--arch", "transformer_lm_moe", "--decoder-layers", str(layers),
                "--decoder-embed-dim", str(s["d"]), "--decoder-ffn-embed-dim", str(s["f"]),
                "--decoder-attention-heads", str(s["heads"]), *moe, "--tokens-per-sample", str(s["seq"]),
                "--share-decoder-input-output-embed"]
    per_side = (("layers", layers), ("embed-dim", s["d"]), ("ffn-embed-dim", s["f"]), ("attention-heads", s["heads"]))
    sides = []
    for side in ("encoder", "decoder"):
        for opt, value in per_side:
            sides += [f"--{side}-{opt}", str(value)]
    return [data, "--task", "moe_translation", "--arch", "transformer_moe", "--source-lang", "src", "--target-lang", "tgt",
            *sides, *moe, "--share-all-embeddings"]


def write_dict(folder: str, names, size: int) -> None:
    for name in names:
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(f"w{i} 1\n" for i in range(size - 4))


def build(kind: str, experts: int, layers: int, extra_args=()):
    """(model, task) on ``DEVICE[0]`` in bf16 with random weights, built by the plugin's task;
    ``extra_args`` are appended to :func:`model_argv`'s (a later flag overrides an earlier one, e.g.
    ``--moe-freq 0`` for the dense model of the same shape)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.modules import SinusoidalPositionalEmbedding

    data = tempfile.mkdtemp()
    write_dict(data, ["dict.txt"] if kind == "lm" else ["dict.src.txt", "dict.tgt.txt"], SHAPES[kind]["vocab"])
    parser = options.get_training_parser()
    argv = model_argv(kind, experts, layers, data) + list(extra_args) + ["--user-dir", USER_DIR]
    args = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):  # no host-side init of billions of parameters
        model = task.build_model(cfg.model)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device=DEVICE[0]).to(torch.bfloat16).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "layer_norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    for m in model.modules():
        if isinstance(m, SinusoidalPositionalEmbedding):  # a non-persistent buffer: recompute it
            m.weights = m.get_embedding(m.weights.size(0), m.embedding_dim, m.padding_idx).to(m.weights)
    reset_moe_counters(model)  # non-persistent buffers too: to_empty left them uninitialised
    return model, task


def set_policy(model, name: str) -> None:
    from fairseq_moe_infer.moe import moe_layers

    gating, fraction = POLICIES[name]
    for m in moe_layers(model):
        m.set_gating(gating, fraction)


def random_tokens(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE[0]).manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), device=DEVICE[0], generator=g)


def lm_runner(model, task):
    from fairseq.sequence_scorer import SequenceScorer

    scorer = SequenceScorer(task.target_dictionary)
    vocab = len(task.target_dictionary)

    block = SHAPES["lm"]["seq"]

    def run(batch_tokens: int, i: int):
        b = max(1, batch_tokens // block)
        src = random_tokens(b, block, vocab, i)
        sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((b,), block, device=DEVICE[0])},
                  "target": torch.roll(src, -1, 1), "ntokens": b * block}
        return scorer.generate([model], sample)

    return run, lambda bt: max(1, bt // block) * block


def mt_encoder_runner(model, task):
    vocab, src_len = len(task.source_dictionary), SHAPES["mt"]["seq"]

    def run(batch_tokens: int, i: int):
        b = max(1, batch_tokens // src_len)
        src = random_tokens(b, src_len, vocab, i)
        return model.encoder(src, src_lengths=torch.full((b,), src_len, device=DEVICE[0]))

    return run, lambda bt: max(1, bt // src_len) * src_len


def mt_generate_runner(model, task):
    from fairseq.sequence_generator import SequenceGenerator

    s = SHAPES["mt"]
    beam, out_len, src_len = s["beam"], s["out_len"], s["seq"]
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=0, max_len_b=out_len,
                            min_len=out_len)
    vocab = len(task.source_dictionary)

    def run(batch_tokens: int, i: int):  # batch_tokens counts generated target tokens
        b = max(1, batch_tokens // out_len)
        src = random_tokens(b, src_len, vocab, i)
        sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((b,), src_len, device=DEVICE[0])}}
        return gen.generate([model], sample)

    return run, lambda bt: max(1, bt // out_len) * out_len


def sweep(run, count, policies, start_tokens, max_tokens, deadline, budget_s, label, world=1, save=lambda rows: None,
          cost=None):
    """Double the batch per policy until out of memory, the time budget or ``max_tokens``.

    Each policy gets an equal share of the time left (so the last one is not starved), and
    stops before a batch whose peak memory :func:`predict_peak_GiB` puts above
    ``MEMORY_HEADROOM`` of the GPU on any rank.
    With ``cost`` (see :func:`floor_ms`) each row also gives its roofline floor and the
    ratio of the measured time to it.

    Returns the rows; ``save(rows_of_this_sweep)`` is called after every row. Under expert
    parallelism an out-of-memory error may leave the ranks in different collectives, so
    the benchmark saves and ends there. Each row also gives the routed rows each GPU's
    experts computed per call, summed over all MoE layers (max / mean over GPUs).
    """
    rows = []
    for n_done, name in enumerate(policies):
        set_policy(MODEL[0], name)
        policy_deadline = time.time() + (deadline - time.time()) / (len(policies) - n_done)
        bt = start_tokens
        peaks = []  # GiB of the points measured so far (this policy, doubling batches)
        while bt <= max_tokens:
            row = {"workload": label, "policy": name, "batch_tokens": count(bt)}
            if any_rank(time.time() > policy_deadline, world):
                row["skipped"] = "time budget"
                rows.append(row)
                break
            predicted = predict_peak_GiB(peaks)
            if any_rank(predicted is not None and predicted > MEMORY_HEADROOM * total_GiB(), world):
                row["skipped"] = f"predicted out of memory ({predicted:.0f} GiB on this GPU)"
                rows.append(row)
                save(rows)
                log_row(row)
                break
            with oom_marks(row):
                with torch.no_grad():
                    free_memory()
                    torch.cuda.reset_peak_memory_stats()
                    reset_moe_counters(MODEL[0])
                    row.update(time_cuda(lambda i: run(bt, i), warmup=1, repeat=3, budget_s=budget_s))
                    row.update(moe_rows_per_gpu(MODEL[0], world, calls=1 + row["repeats"]))
                row["tokens_per_s"] = round(count(bt) / (row["median_ms"] / 1000), 1)
                if cost:
                    row["floor_ms"] = round(floor_ms(count(bt), label, cost), 3)
                    row["x_floor"] = round(row["median_ms"] / row["floor_ms"], 2)
                row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                peaks.append(row["peak_memory_GiB"])
            free_memory()
            rows.append(row)
            save(rows)
            log_row(row)
            if row.get("oom"):
                if world > 1:
                    row["aborted"] = "out of memory under expert parallelism; later points not measured"
                    exit_after_oom_under_expert_parallelism(lambda: save(rows))
                break
            bt *= 2
    return rows


MODEL = [None]
DEVICE = ["cuda"]  # --device cpu: toy-size checks of the trace replay (and benchmarks/characterize.py) without a GPU
MEMORY_HEADROOM = 0.95  # skip a point predicted above this share of the GPU's memory


def total_GiB() -> float:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def predict_peak_GiB(peaks):
    """Peak memory of the next (doubled) batch from the last measured ones, or None with
    fewer than two. Three points: the quadratic through them (memory grows as a + bT + cT^2:
    static gating's one-hot [T, E, C] tensors are quadratic, activations linear), evaluated
    at twice the last batch: 8 p1 - 14 p2 + 7 p3. Two points: the last increment times 4
    (the quadratic's worst case). Under expert parallelism an out-of-memory error may leave
    the ranks in different collectives, so such points are predicted and skipped instead.
    """
    if len(peaks) >= 3:
        p1, p2, p3 = peaks[-3:]
        return max(8 * p1 - 14 * p2 + 7 * p3, p3)
    if len(peaks) == 2:
        return peaks[1] + 4 * max(peaks[1] - peaks[0], 0.0)
    return None



def flops_per_token(kind: str, workload: str, experts: int, layers: int) -> float:
    """Matmul FLOPs the model must do per counted token (the useful work: top-2 experts, no
    padding; attention scores over the whole block as fairseq computes them).

    ``lm-eval``: a 512-token block through ``layers`` decoder layers and the output
    projection; ``mt-encoder``: a 64-token source through the encoder; ``mt-generate``: per
    generated target token, beam 4 hypotheses each taking a decoder step (self-attention over
    the prefix, cross-attention over 64 source tokens, output projection) plus the
    sentence's encoder pass and cross-attention keys/values spread over its 32 tokens.
    Multiply-accumulates count 2 FLOPs.
    """
    s = SHAPES[kind]
    d, f = s["d"], s["f"]

    def ffn(i):  # MoE on every moe_every-th layer (fairseq's --moe-freq), else dense
        return 2 * 2 * d * f + d * experts if (i + 1) % s["moe_every"] == 0 else 2 * d * f

    def self_layers(ctx):
        return sum(4 * d * d + 2 * ctx * d + ffn(i) for i in range(layers))

    if workload == "lm-eval":
        macs = self_layers(s["seq"]) + s["vocab"] * d
    elif workload == "mt-encoder":
        macs = self_layers(s["seq"])
    else:
        n, beam, src = s["out_len"], s["beam"], s["seq"]
        decoder_steps = sum(self_layers(t) + layers * (2 * d * d + 2 * src * d) + s["vocab"] * d for t in range(1, n + 1))
        per_sentence = src * self_layers(src) + beam * decoder_steps + beam * layers * 2 * d * d * src
        macs = per_sentence / n
    return 2.0 * macs


def floor_ms(tokens: int, workload: str, cost: dict) -> float:
    """Roofline floor of one call: max(FLOPs / measured bf16 matmul rate, weight bytes read /
    measured copy rate). Weights are read once per forward, in generate all decoder weights
    once per each of 32 steps: an approximation (fairseq runs a 33rd step for the end of
    sentence; at small batches not every expert is reached, so fewer bytes are needed)."""
    flops = tokens * cost["flops_per_token"][workload]
    c = cost["ceilings"]
    return 1000 * max(flops / (c["bf16_matmul_tflops"] * 1e12),
                      cost["weight_bytes_per_call"][workload] / (c["copy_GBps_read_plus_write"] * 1e9))


def summarize(rows):
    best = {}
    for r in rows:
        if "tokens_per_s" in r:
            key = (r["workload"], r["policy"])
            if r["tokens_per_s"] > best.get(key, {}).get("tokens_per_s", 0):
                best[key] = r
    out = {}
    for (workload, policy), r in best.items():
        out.setdefault(workload, {})[policy] = {"max_tokens_per_s": r["tokens_per_s"], "at_batch_tokens": r["batch_tokens"],
                                                 "peak_memory_GiB": r["peak_memory_GiB"]}
        for key in ("x_floor", "rows_per_gpu_max_over_mean"):
            if key in r:
                out[workload][policy][key] = r[key]
    for workload, pol in out.items():
        if "dynamic" in pol:
            for s in ("static-0.25", "static-1.0"):
                if s in pol:
                    pol[f"dynamic_over_{s}"] = round(pol["dynamic"]["max_tokens_per_s"] / pol[s]["max_tokens_per_s"], 2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["lm", "mt"], required=True)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="LM layers (24) or MT layers per side (12)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--workloads", nargs="+", default=["mt-encoder", "mt-generate"],
                   choices=["mt-encoder", "mt-generate", "mt-replay"],
                   help="MT workloads to run (--model mt); mt-replay: expert buffering driven by --replay-trace "
                        "(benchmarks/trace_replay.py), against the all-resident dynamic model")
    p.add_argument("--replay-trace", nargs="+", default=None,
                   help="mt-replay: routing traces of a trained MT MoE model (fairseq-generate --moe-record-trace)")
    p.add_argument("--replay-policies", nargs="+", default=["lifo", "lru", "fifo", "lfu", "belady"],
                   help="mt-replay: eviction policies")
    p.add_argument("--replay-sentences", nargs="+", type=int, default=[1, 8, 64], help="mt-replay: sentences per batch")
    p.add_argument("--replay-fractions", nargs="+", type=int, default=[16, 8, 4, 2, 1],
                   help="mt-replay: K = E / fraction slots per decoder MoE layer")
    p.add_argument("--replay-repeat", type=int, default=3, help="mt-replay: timed runs per point (after one warm-up)")
    p.add_argument("--replay-prefetch", nargs="+", default=["none"], choices=["none", "previous-step"],
                   help="mt-replay: --moe-prefetch predictors to measure for every K and policy (gate: see "
                        "benchmarks/prefetch_generate.py)")
    p.add_argument("--replay-cpu-experts", nargs="+", default=["off"], choices=["off", "auto"],
                   help="mt-replay: --moe-cpu-experts modes to measure for every K and policy")
    p.add_argument("--replay-allow-incomplete", action="store_true",
                   help="mt-replay: accept routing traces of interrupted runs (complete=false, e.g. stopped by SIGTERM)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: toy-size check of mt-replay only")
    p.add_argument("--toy", action="store_true", help="mt-replay at a toy size (d=64, f=128; a CPU check of the code)")
    p.add_argument("--generate-start-tokens", type=int, default=256, help="first generated-token batch of mt-generate")
    p.add_argument("--start-tokens", type=int, default=512, help="first batch (tokens per GPU) of lm-eval / mt-encoder")
    p.add_argument("--max-tokens", type=int, default=262144)
    p.add_argument("--budget-s", type=float, default=3.0, help="timed seconds per point at most")
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    DEVICE[0] = a.device
    if "mt-replay" in a.workloads:
        if a.model != "mt" or not a.replay_trace:
            p.error("--workloads mt-replay needs --model mt and --replay-trace PATH [PATH ...]")
        return replay_main(a)
    rank, world = init_distributed()
    deadline = time.time() + 60 * a.max_minutes
    layers = a.layers or (24 if a.model == "lm" else 12)
    t0 = time.time()
    model, task = build(a.model, a.experts, layers)
    MODEL[0] = model
    n_params = sum(p.numel() for p in model.parameters())
    info = {"build_seconds": round(time.time() - t0, 1), "parameters_per_gpu": n_params,
            "weights_GiB_per_gpu": round(torch.cuda.memory_allocated() / 2**30, 2)}
    print(info, file=sys.stderr, flush=True)

    def weight_bytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    n_out = SHAPES["mt"]["out_len"]
    cost = {"ceilings": measure_ceilings(),
            "flops_per_token": {w: flops_per_token(a.model, w, a.experts, layers)
                                for w in (["lm-eval"] if a.model == "lm" else ["mt-encoder", "mt-generate"])},
            "weight_bytes_per_call": ({"lm-eval": weight_bytes(model)} if a.model == "lm" else
                                      {"mt-encoder": weight_bytes(model.encoder),
                                       "mt-generate": weight_bytes(model.encoder) + n_out * weight_bytes(model.decoder)})}
    if world > 1:  # every GPU does its own tokens' work: the floor is per GPU
        cost["note"] = "per GPU: its own batch's FLOPs, its own weight bytes"
    info["floor"] = cost
    print(cost, file=sys.stderr, flush=True)
    rows = []

    def save(sweep_rows=()):  # after every row, so a later hang or kill keeps what was measured
        if rank == 0:
            done = rows + list(sweep_rows)
            write_json(a.out, {"benchmark": f"end_to_end_{a.model}", "run": run_info(), "model": info,
                               "experts": a.experts, "layers": layers, "rows": done, "summary": summarize(done)})

    if a.model == "lm":
        run, count = lm_runner(model, task)
        rows += sweep(run, count, a.policies, a.start_tokens, a.max_tokens, deadline, a.budget_s, "lm-eval", world, save,
                      cost)
    else:
        if "mt-encoder" in a.workloads:
            run, count = mt_encoder_runner(model, task)
            half = deadline - 60 * a.max_minutes / 2 if "mt-generate" in a.workloads else deadline
            rows += sweep(run, count, a.policies, a.start_tokens, a.max_tokens, half, a.budget_s, "mt-encoder", world,
                          save, cost)
        if "mt-generate" in a.workloads:
            run, count = mt_generate_runner(model, task)
            rows += sweep(run, count, a.policies, a.generate_start_tokens, a.max_tokens // 8, deadline, a.budget_s,
                          "mt-generate", world, save, cost)
    save()
    summary = summarize(rows)
    for workload, pol in summary.items():
        print(workload, pol)


def replay_main(a) -> None:
    """``--workloads mt-replay``: one process, the all-resident dynamic model against decoder expert
    buffering for every K and policy, with recorded routing (benchmarks/trace_replay.py)."""
    from benchmarks.trace_replay import plot_replay, replay_rows

    deadline = time.time() + 60 * a.max_minutes
    layers = a.layers or 12
    if a.toy:
        SHAPES["mt"].update(d=64, f=128, heads=2, vocab=1000, seq=8, out_len=4)
    model, task = build("mt", a.experts, layers)
    set_policy(model, "dynamic")
    s = SHAPES["mt"]
    info = {"experts": a.experts, "layers_per_side": layers, "d": s["d"], "f": s["f"], "beam": s["beam"],
            "generated_tokens": s["out_len"], "source_tokens": s["seq"], "traces": a.replay_trace}

    def save(rows):
        write_json(a.out, {"benchmark": "end_to_end_mt_replay", "run": run_info(), "model": info, "rows": rows})

    rows = replay_rows(model, task, a.replay_trace, a.replay_sentences, a.replay_fractions, a.replay_policies,
                       a.replay_repeat, deadline, save, src_len=s["seq"], out_len=s["out_len"], beam=s["beam"],
                       prefetches=a.replay_prefetch, cpu_modes=a.replay_cpu_experts,
                       allow_incomplete=a.replay_allow_incomplete)
    save(rows)
    plot_replay(rows, os.path.splitext(a.out)[0] + ".png")


if __name__ == "__main__":
    main()
