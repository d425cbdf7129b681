"""Plan an expert placement (``--moe-placement``) from routing traces.

Reads traces recorded with ``--moe-record-trace``, places every MoE layer's experts on G GPUs
with S slots each by one policy of :mod:`fairseq_moe_infer.placement_planner` (contiguous,
greedy, anti_correlation, replicate; optionally refined by ``--local-search``), writes the placement JSON and prints the simulated
per-batch max/mean GPU load on the planning traces and on held-out traces.

    python scripts/plan_placement.py --trace mt_en-de.npz --heldout mt_en-fr.npz \\
        --gpus 2 --slots 9 --policy replicate --out placement.json
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_moe_infer import placement_planner as pp  # noqa: E402
from fairseq_moe_infer.trace import TraceError  # noqa: E402


def _show(label: str, placement, counts) -> None:
    r = pp.placement_ratios(placement, counts)
    stacks = "  ".join(f"{k} {v['step_max_over_mean']:.3f} (worst layer {v['worst_layer']:.3f})"
                       for k, v in r.items() if k != "layers")
    print(f"{label}: per-batch max/mean GPU load {stacks}")
    for name, v in r["layers"].items():
        print(f"  {name}: {v['step_max_over_mean']:.3f} over {v['batches']} batches "
              f"(worst batch {v['worst_batch_max_over_mean']:.3f}, run totals {v['run_max_over_mean']:.3f})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", nargs="+", required=True, help="routing traces to plan on (.npz)")
    p.add_argument("--heldout", nargs="*", default=[], help="routing traces to evaluate the placement on")
    p.add_argument("--gpus", type=int, required=True, help="expert-parallel world size G")
    p.add_argument("--slots", type=int, default=None, help="expert slots per GPU S (default E / G; more = replicas)")
    p.add_argument("--policy", default="greedy", choices=list(pp.POLICIES))
    p.add_argument("--local-search", action="store_true",
                   help="refine the policy's plan by swapping experts between GPUs where that lowers the per-batch "
                        "maximum GPU load on the planning traces (placement_planner.refine_by_swaps)")
    p.add_argument("--out", default=None, help="placement JSON to write (for --moe-placement)")
    a = p.parse_args(argv)
    if a.gpus < 1 or (a.slots is not None and a.slots < 1):
        raise SystemExit(f"plan_placement.py: error: need at least one GPU and one slot per GPU, got --gpus {a.gpus}, "
                         f"--slots {a.slots}")
    if a.out and not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        raise SystemExit(f"plan_placement.py: error: --out {a.out}: folder {os.path.dirname(os.path.abspath(a.out))} does "
                         "not exist; create it first")
    try:
        counts = pp.trace_layer_counts(a.trace)
        heldout = pp.trace_layer_counts(a.heldout) if a.heldout else None
    except TraceError as e:
        raise SystemExit(f"plan_placement.py: error: {e}")
    e = next(iter(counts.values())).shape[1]
    slots = a.slots if a.slots is not None else -(-e // a.gpus)
    if heldout is not None and sorted(heldout) != sorted(counts):
        raise SystemExit("plan_placement.py: error: the held-out traces are of another model (other MoE layers)")
    held_e = next(iter(heldout.values())).shape[1] if heldout is not None else e
    if held_e != e:
        raise SystemExit(f"plan_placement.py: error: the held-out traces are of another model ({held_e} experts per MoE "
                         f"layer, the planning traces {e})")
    try:
        placement = pp.plan_placement(a.policy, counts, a.gpus, slots, a.local_search,
                                      traces=[os.path.basename(t) for t in a.trace])
    except ValueError as err:
        raise SystemExit(f"plan_placement.py: error: {err}")
    print(f"{a.policy}{' + local search' if a.local_search else ''}: {len(counts)} MoE layers, E={e}, G={a.gpus}, S={slots}")
    _show("planned-on traces", placement, counts)
    if heldout is not None:
        _show("held-out traces", placement, heldout)
    if a.out:
        placement.save(a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
