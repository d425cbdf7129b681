"""Measured step time of expert-parallel MoE layers under placement policies, by trace replay.

Under ``torchrun --nproc-per-node G`` (NCCL on GPUs; gloo on CPU for a toy check) each policy
(``contiguous``, ``greedy``, ``replicate``, ...; :mod:`fairseq_moe_infer.placement_planner`) is
planned on the first half of one recorded MoE layer's calls (``--moe-record-trace``) and the
second half is replayed: each call's recorded top-k choices (every token repeated
``--token-scale`` times, to reach serving batch sizes) are split over the ranks (rank r takes
tokens r, r + G, ...), mapped to physical slots by the placement
(:class:`~fairseq_moe_infer.moe.placement.LayerPlacement`) and run through the dynamic
dispatcher's all-to-all and the experts (random weights, ``--dim`` x ``--ffn-dim``, bf16 on
GPU). The gate is not run (its cost does not depend on placement). Timed with CUDA events
after warm-up, median of repeats, each repeat replaying all calls; reported as tokens/s and
mean step time, and as ratio to contiguous measured in the same run, beside the simulated
per-batch max/mean GPU load of each policy on the replayed calls.

    torchrun --nproc-per-node 2 benchmarks/bench_placement.py \\
        --trace benchmarks/results/traces/mt_en-de.npz --layer decoder.layers.1.moe_layer \\
        --out benchmarks/results/placement_2xh200.json
"""

import argparse
import functools
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import median_time_s, run_info, write_json  # noqa: E402
from fairseq_moe_infer import placement_planner as pp  # noqa: E402
from fairseq_moe_infer.moe.dispatch import DynamicDispatcher  # noqa: E402
from fairseq_moe_infer.moe.experts import Experts  # noqa: E402
from fairseq_moe_infer.moe.gate import Routing  # noqa: E402
from fairseq_moe_infer.moe.placement import LayerPlacement  # noqa: E402
from fairseq_moe_infer.trace import read_trace  # noqa: E402


def _init() -> tuple:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _replay(dispatcher, inputs, routings, experts, group) -> None:
    with torch.no_grad():
        for (x, _), r in zip(inputs, routings):
            dispatcher(x, r, experts, group, False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="routing trace (.npz) of the model")
    p.add_argument("--layer", default=None, help="MoE layer name (default: the trace's last layer)")
    p.add_argument("--policies", nargs="+", default=["contiguous", "greedy", "replicate"], choices=list(pp.POLICIES))
    p.add_argument("--spare-slots", type=int, default=1, help="slots per GPU beyond E / G (used by replicate)")
    p.add_argument("--dim", type=int, default=1024, help="model dim d of the replayed experts")
    p.add_argument("--ffn-dim", type=int, default=4096, help="expert hidden dim f")
    p.add_argument("--token-scale", type=int, default=8, help="repeat every recorded token this many times")
    p.add_argument("--calls", type=int, default=200, help="replay at most this many calls of the second half")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON results (rank 0)")
    a = p.parse_args(argv)
    rank, world = _init()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trace = read_trace(a.trace)
    layer = a.layer or trace.layer_names[-1]
    e = trace.num_experts
    counts = trace.expert_counts(layer)
    calls = trace.calls_of(layer)
    half = len(calls) // 2
    plan_counts, replay = counts[:half], calls[half:][: a.calls]
    replay_counts = counts[half:][: a.calls] * a.token_scale
    group = dist.group.WORLD if world > 1 else None

    inputs = []
    g = torch.Generator().manual_seed(1234 + rank)
    for i in replay:
        ch = torch.from_numpy(trace.call_choices(i).astype(np.int64)).repeat(a.token_scale, 1)[rank::world]
        x = torch.randn(ch.shape[0], a.dim, generator=g).to(device, dtype)
        inputs.append((x, ch.to(device)))
    tokens = sum(int(trace.call_tokens[i]) for i in replay) * a.token_scale

    rows, dispatcher = [], DynamicDispatcher()
    for policy in a.policies:
        base = -(-e // world)
        slots = base + (a.spare_slots if policy == "replicate" else 0)
        plan = pp.plan_layer(policy, plan_counts, world, slots)
        placement = LayerPlacement(plan, e, world).to(device)
        torch.manual_seed(0)
        experts = Experts(a.dim, a.ffn_dim, slots, "relu", 0.0, e, expert_index=placement.local_experts(rank))
        experts = experts.to(device, dtype).eval()
        routings = []
        for x, ch in inputs:
            valid = ch >= 0
            logical = Routing(ch.clamp(min=0), torch.full(ch.shape, 0.5, device=device), valid,
                              torch.zeros((), device=device), e, True)
            routings.append(placement.route(logical))

        t = median_time_s(functools.partial(_replay, dispatcher, inputs, routings, experts, group), device, a.warmup,
                          a.repeat, slowest_rank=True)
        sim = pp.load_ratios(pp.gpu_loads(replay_counts, plan, world))
        rows.append({"policy": policy, "slots_per_gpu": slots, "seconds": t, "tokens_per_s": tokens / t,
                     "mean_step_ms": 1000 * t / len(replay), "simulated": sim, "plan": plan})
        if rank == 0:
            print(f"{policy:>16}: S={slots} {tokens / t:,.0f} tokens/s, step {1000 * t / len(replay):.3f} ms, "
                  f"simulated max/mean {sim['step_max_over_mean']:.3f}", flush=True)
    base_row = next((r for r in rows if r["policy"] == "contiguous"), rows[0])
    for r in rows:
        r["speedup_vs_" + base_row["policy"]] = base_row["seconds"] / r["seconds"]
        r["simulated_speedup"] = base_row["simulated"]["step_max_over_mean"] / r["simulated"]["step_max_over_mean"]
    if rank == 0:
        for r in rows:
            print(f"{r['policy']:>16}: measured speedup {r['speedup_vs_' + base_row['policy']]:.3f}, "
                  f"simulated {r['simulated_speedup']:.3f}")
        if a.out:
            write_json(a.out, {**run_info(argv), "trace": os.path.basename(a.trace), "layer": layer, "world_size": world,
                               "calls": len(replay), "tokens": tokens, "dim": a.dim, "ffn_dim": a.ffn_dim,
                               "token_scale": a.token_scale, "rows": rows})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
