#!/usr/bin/env python3
"""Benchmark the MoE layer alone: static vs dynamic gating, bf16, against the roofline floor.

For each expert shape E x d x f and token count T (tokens per GPU), times one
evaluation-mode forward of :class:`fairseq_moe_infer.moe.MoELayer` (top-2) under

* ``static-0.25``: fairseq static gating, eval capacity ceil(0.25 T) per expert;
* ``static-1.0``:  static gating with capacity T (drops nothing);
* ``dynamic``:     dynamic gating (sorted by expert, grouped GEMM, fused Triton
  bias/activation and un-permute/combine);
* ``dynamic-graph``: the same captured once in a CUDA graph and replayed (one
  GPU only: the expert-parallel path reads split sizes on the host), which
  removes the host launch overhead that dominates small batches;

and reports the median time, the peak activation memory (beyond weights and
input) and the ratio to the floor ``max(FLOPs / bf16 matmul rate,
expert weight bytes / copy rate)``, both rates measured in the same run.
Every row also gives the routed rows each GPU's experts computed (max and mean
over GPUs; static: plus the padded rows it computes) and, under expert
parallelism, the all-to-all share of the layer time: the layer's exchanges
(dynamic: count exchange + variable all-to-all there and back with the split
sizes of the measured batch; static: the T all-reduce + two fixed [E*C, d]
all-to-alls) replayed alone, timed the same way, over the layer's median.
Under expert parallelism the ranks agree before every measurement (time budget,
predicted static OOM), since a rank leaving a collective out would hang the rest.
FLOPs = 2 GEMMs x 2 x d x f per routed token x k=2 choices. Under torchrun the
experts are sharded over the GPUs (expert parallelism) and every GPU routes its
own T tokens; the floor is per GPU (its local expert bytes), communication excluded.

Example:
    python benchmarks/bench_moe_layer.py --out benchmarks/results/moe_layer_h200.json
    torchrun --nproc-per-node 2 benchmarks/bench_moe_layer.py --out benchmarks/results/moe_layer_2xh200.json
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    any_rank,
    exit_after_oom_under_expert_parallelism,
    free_memory,
    init_distributed,
    is_oom,
    log_row,
    measure_ceilings,
    rows_per_gpu,
    run_info,
    time_cuda,
    write_json,
)
from fairseq_moe_infer.moe import MoELayer  # noqa: E402

POLICIES = {"static-0.25": ("static", 0.25), "static-1.0": ("static", 1.0), "dynamic": ("dynamic", 0.25),
            "dynamic-graph": ("dynamic", 0.25)}


def layer_rows_per_gpu(layer: MoELayer, world: int) -> dict:
    """:func:`~benchmarks.common.rows_per_gpu` of the last forward, plus static gating's padded rows."""
    out = rows_per_gpu(layer.last_stats.expert_counts, world)
    if layer.last_stats.capacity > 0:
        out["padded_rows_per_gpu"] = layer.last_stats.capacity * layer.num_experts  # E_local * world * C
    return out


def static_oom_predicted(T: int, E: int, fraction: float, world: int) -> bool:
    """The static path's one-hot [T, E, C] tensors (about 3 alive at once, bf16) exceed free memory on some rank."""
    need = 3 * T * E * math.ceil(fraction * T) * 2
    return any_rank(need > 0.9 * torch.cuda.mem_get_info()[0], world)


def all_to_all_replay_ms(layer: MoELayer, d: int, world: int, budget_s: float) -> float:
    """Median ms of the last forward's exchanges replayed alone (see the module docstring)."""
    import torch.distributed as dist

    stats = layer.last_stats
    if stats.capacity > 0:  # static: all-reduce of T, then [E*C, d] there and back
        buf = torch.randn(layer.num_experts * stats.capacity, d, device="cuda", dtype=torch.bfloat16)
        out, t = torch.empty_like(buf), torch.ones(1, device="cuda")

        def exchange(_):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            dist.all_to_all_single(out, buf)
            dist.all_to_all_single(buf, out)
    else:  # dynamic: counts, then the routed rows there and back with their split sizes
        counts = stats.expert_counts
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        in_splits = counts.view(world, -1).sum(1).tolist()
        out_splits = recv_counts.view(world, -1).sum(1).tolist()
        send = torch.randn(sum(in_splits), d, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty(sum(out_splits), d, device="cuda", dtype=torch.bfloat16)

        def exchange(_):
            dist.all_to_all_single(recv_counts, counts)
            dist.all_to_all_single(recv, send, out_splits, in_splits)
            dist.all_to_all_single(send, recv, in_splits, out_splits)
    return time_cuda(exchange, warmup=2, repeat=10, budget_s=budget_s)["median_ms"]


def graphed(layer: MoELayer, example: torch.Tensor):
    """``layer`` captured in a CUDA graph: returns fn(x) copying x into the static input and replaying."""
    static_x = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (Triton compiles) outside the capture
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)

    def run(x):
        static_x.copy_(x)
        graph.replay()
        return static_y

    return run


def bench_shape(E, d, f, tokens, policies, ceilings, world, budget_s, deadline, save):
    """Rows for one expert shape; ``save(rows_of_this_shape)`` is called after every row."""
    torch.manual_seed(0)
    layer = MoELayer(d, f, E, k=2).cuda().to(torch.bfloat16).eval()
    local_weight_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    rows = []
    for T in tokens:
        flops = 2 * 2 * d * f * 2 * T  # per GPU: its T tokens' worth of expert work on average
        floor_ms = 1000 * max(flops / (ceilings["bf16_matmul_tflops"] * 1e12),
                              local_weight_bytes / (ceilings["copy_GBps_read_plus_write"] * 1e9))
        inputs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for name in policies:
            gating, fraction = POLICIES[name]
            row = {"E": E, "d": d, "f": f, "tokens_per_gpu": T, "policy": name, "floor_ms": round(floor_ms, 4)}
            if name == "dynamic-graph" and world > 1:
                continue
            if any_rank(time.time() > deadline, world):
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            if gating == "static" and static_oom_predicted(T, E, fraction, world):
                row.update(oom=True, oom_predicted=True)
                rows.append(row)
                log_row(row)
                continue
            layer.set_gating(gating, fraction)
            try:
                with torch.no_grad():
                    free_memory()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    forward = graphed(layer, inputs[0]) if name == "dynamic-graph" else layer
                    forward(inputs[0])
                    torch.cuda.synchronize()
                    row["peak_activation_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                    row["dropped_pct"] = round(100 * layer.last_stats.dropped.item() / max(layer.last_stats.routed.item(), 1), 2)
                    row.update(layer_rows_per_gpu(layer, world))
                    row.update(time_cuda(lambda i: forward(inputs[i % 3]), warmup=2, repeat=10, budget_s=budget_s))
                    if world > 1:
                        a2a = all_to_all_replay_ms(layer, d, world, budget_s)
                        row["all_to_all_ms"] = round(a2a, 4)
                        row["all_to_all_share"] = round(a2a / row["median_ms"], 3)
                    forward = None  # frees a captured graph
                row["x_floor"] = round(row["median_ms"] / floor_ms, 3)
                row["tokens_per_s"] = round(T * world / (row["median_ms"] / 1000))
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                row["oom"] = True
                if world > 1:  # the ranks may have left different collectives half done: stop here
                    row["aborted"] = "out of memory under expert parallelism; later rows not measured"
                    rows.append(row)
                    exit_after_oom_under_expert_parallelism(lambda: save(rows))
            free_memory()
            rows.append(row)
            save(rows)
            log_row(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x1024x4096", "128x2048x8192"], help="E x d x f")
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 32768, 131072], help="tokens per GPU")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--budget-s", type=float, default=2.0, help="timed seconds per measurement at most")
    p.add_argument("--max-minutes", type=float, default=30.0, help="skip remaining measurements after this")
    p.add_argument("--out", required=True, help="JSON results path")
    a = p.parse_args(argv)
    rank, world = init_distributed()
    deadline = time.time() + 60 * a.max_minutes
    ceilings = measure_ceilings()
    rows = []
    for shape in a.shapes:
        E, d, f = (int(v) for v in shape.split("x"))
        def save(shape_rows, done=list(rows)):  # after every row, so a later hang or kill keeps what was measured
            if rank == 0:
                write_json(a.out, {"benchmark": "moe_layer", "run": run_info(), "ceilings": ceilings,
                                   "rows": done + shape_rows})

        rows += bench_shape(E, d, f, a.tokens, a.policies, ceilings, world, a.budget_s, deadline, save)
    print_table(rows)


def print_table(rows):
    print(f"{'shape':>15} {'T/GPU':>7} {'policy':>13} {'ms':>9} {'x floor':>8} {'act MiB':>9} {'drop%':>6} "
          f"{'rows/GPU max/mean':>18} {'a2a share':>10}")
    for r in rows:
        shape = f"{r['E']}x{r['d']}x{r['f']}"
        ms = "OOM" if r.get("oom") else r.get("skipped", f"{r.get('median_ms', 0):.3f}")
        print(f"{shape:>15} {r['tokens_per_gpu']:>7} {r['policy']:>13} {ms:>9} {r.get('x_floor', ''):>8} "
              f"{r.get('peak_activation_MiB', ''):>9} {r.get('dropped_pct', ''):>6} "
              f"{r.get('rows_per_gpu_max_over_mean', ''):>18} {r.get('all_to_all_share', ''):>10}")


if __name__ == "__main__":
    main()
