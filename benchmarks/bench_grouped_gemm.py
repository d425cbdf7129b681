#!/usr/bin/env python3
"""The expert GEMMs of the dynamic path, alone: ``torch._grouped_mm`` + ``bias_act_rows_`` vs the fused Triton kernel.

For each expert shape E x d x f and token count T (top-2: N = 2T rows, grouped by expert
from random gate logits with a per-expert skew, so groups are uneven as in a trained
model), bf16, times

* ``grouped_mm+bias_act``: what :meth:`Experts._grouped_mm` runs at inference today:
  ``torch._grouped_mm`` then :func:`~fairseq_moe_infer.moe.kernels.bias_act_rows_`
  (a second pass over the output), for fc1 (gelu) and fc2 (identity);
* ``fused <config>``: :func:`~fairseq_moe_infer.moe.kernels.grouped_linear_bias_act`
  for both, bias and activation in the GEMM epilogue, with its default config
  (``grouped_linear_config``) and the sweep ``--configs``;

each fc1 and fc2 timed separately (CUDA events, warm-up, median, three input sets
rotated: x, routing and fc2's input differ between repeats), against the floors
measured in the same run: FLOPs (2 N k n per GEMM) at the bf16 matmul rate of a
large ``torch.mm``, and one read of the GEMM's expert weights at the
device-to-device copy rate. Before timing, every fused config is checked against
``grouped_mm+bias_act`` on the same inputs (relative Frobenius error, bf16; ``ok``
below 1e-2). Points not reached within ``--max-minutes`` are recorded as skipped.

Example:
    python benchmarks/bench_grouped_gemm.py --out benchmarks/results/grouped_gemm_h200.json
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import free_memory, log_row, measure_ceilings, run_info, time_cuda, write_json  # noqa: E402
from fairseq_moe_infer.moe.kernels import (  # noqa: E402
    GemmConfig,
    bias_act_rows_,
    grouped_linear_bias_act,
    grouped_linear_config,
)

DEFAULT_CONFIGS = ["64x128x64/8/4/4", "128x128x64/8/8/4", "128x256x64/8/8/3"]


def parse_config(text: str) -> GemmConfig:
    """``BMxBNxBK/group_m/num_warps/num_stages`` -> GemmConfig."""
    tile, group_m, warps, stages = text.split("/")
    bm, bn, bk = (int(v) for v in tile.split("x"))
    return GemmConfig(bm, bn, bk, int(group_m), int(warps), int(stages))


def config_name(c: GemmConfig) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k}/{c.group_m}/{c.num_warps}/{c.num_stages}"


def routing(E: int, tokens: int, skew: float, g: torch.Generator, device) -> tuple:
    """Top-2 of random gate logits (+ a per-expert offset ~ N(0, skew^2)): counts [E] int64 and the sorted
    expert of each of the 2 * tokens rows."""
    logits = torch.randn(tokens, E, device=device, generator=g) + skew * torch.randn(E, device=device, generator=g)
    experts = logits.topk(2, dim=1).indices.flatten().sort().values
    return torch.bincount(experts, minlength=E), experts


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_point(E, d, f, T, weights, configs, ceilings, skew, budget_s, device) -> list:
    """Rows (one per method) for one shape and token count."""
    w1, b1, w2, b2 = weights
    g = torch.Generator(device=device).manual_seed(T)
    sets = []
    for _ in range(3):
        counts, expert_of_row = routing(E, T, skew, g, device)
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(2 * T, d, device=device, dtype=torch.bfloat16, generator=g)
        h = bias_act_rows_(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs), b1, expert_of_row, "gelu")
        sets.append((x, h, counts, offs, expert_of_row))
    counts = sets[0][2].double()
    base = {"E": E, "d": d, "f": f, "tokens": T, "rows": 2 * T,
            "rows_per_group_mean": round(float(counts.mean()), 1), "rows_per_group_max": int(counts.max()),
            "empty_groups": int((counts == 0).sum())}
    floors = {}
    for fc, (k_in, n_out) in (("fc1", (d, f)), ("fc2", (f, d))):
        flop_ms = 1000 * 2 * 2 * T * k_in * n_out / (ceilings["bf16_matmul_tflops"] * 1e12)
        read_ms = 1000 * E * k_in * n_out * 2 / (ceilings["copy_GBps_read_plus_write"] * 1e9)
        floors[fc] = {"flop_floor_ms": round(flop_ms, 4), "weight_read_floor_ms": round(read_ms, 4),
                      "floor_ms": round(max(flop_ms, read_ms), 4)}

    def baseline(fc, s):
        x, h, counts, offs, eor = s
        if fc == "fc1":
            return bias_act_rows_(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs), b1, eor, "gelu")
        return bias_act_rows_(torch._grouped_mm(h, w2.transpose(1, 2), offs=offs), b2, eor, "identity")

    def fused(fc, s, config):
        x, h, counts, offs, eor = s
        if fc == "fc1":
            return grouped_linear_bias_act(x, w1, b1, counts, "gelu", config=config)
        return grouped_linear_bias_act(h, w2, b2, counts, "identity", config=config)

    default = grouped_linear_config(2 * T, E)
    methods = [("grouped_mm+bias_act", None, baseline)]
    for c in [default] + [c for c in configs if c != default]:
        name = f"fused {config_name(c)}" + (" (default)" if c == default else "")
        methods.append((name, c, lambda fc, s, c=c: fused(fc, s, c)))
    refs = {fc: baseline(fc, sets[0]) for fc in ("fc1", "fc2")}
    rows = []
    with torch.no_grad():
        for name, config, fn in methods:
            row = dict(base, method=name)
            try:
                total = 0.0
                for fc in ("fc1", "fc2"):
                    if config is not None:
                        err = rel_err(fn(fc, sets[0]), refs[fc])
                        row[f"{fc}_rel_err_vs_grouped_mm"] = round(err, 6)
                        row[f"{fc}_ok"] = err < 1e-2
                    t = time_cuda(lambda i, fc=fc: fn(fc, sets[i % 3]), warmup=2, repeat=10, budget_s=budget_s)
                    row[f"{fc}_ms"] = round(t["median_ms"], 4)
                    row[f"{fc}_x_floor"] = round(t["median_ms"] / floors[fc]["floor_ms"], 3)
                    row.update({f"{fc}_{k}": v for k, v in floors[fc].items()})
                    total += t["median_ms"]
                row["fc1_plus_fc2_ms"] = round(total, 4)
            except Exception as e:  # a config that does not compile or fit (shared memory): recorded, the sweep goes on
                if config is None:
                    raise
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                free_memory()
            rows.append(row)
            log_row(row)
    base_ms = rows[0]["fc1_plus_fc2_ms"]
    for row in rows:
        if "fc1_plus_fc2_ms" in row:
            row["speedup_vs_grouped_mm"] = round(base_ms / row["fc1_plus_fc2_ms"], 3)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x1024x4096", "128x1024x4096", "128x2048x8192"], help="E x d x f")
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 32768, 131072], help="tokens (N = 2 x tokens rows)")
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                   help="fused-kernel configs BMxBNxBK/group_m/num_warps/num_stages, besides the default one")
    p.add_argument("--skew", type=float, default=1.0, help="std of the per-expert gate-logit offset (uneven groups)")
    p.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per measurement at most")
    p.add_argument("--max-minutes", type=float, default=3.5, help="skip the remaining points after this")
    p.add_argument("--out", required=True, help="JSON results path")
    a = p.parse_args(argv)
    deadline = time.time() + 60 * a.max_minutes
    configs = [parse_config(c) for c in a.configs]
    ceilings = measure_ceilings()
    rows = []
    for shape in a.shapes:
        E, d, f = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = []
        for k_in, n_out in ((d, f), (f, d)):  # nn.Linear's init range, per expert
            bound = k_in ** -0.5
            weights.append((torch.rand(E, n_out, k_in, device="cuda", generator=g) * 2 - 1).mul_(bound).to(torch.bfloat16))
            weights.append((torch.rand(E, n_out, device="cuda", generator=g) * 2 - 1).mul_(bound).to(torch.bfloat16))
            free_memory()
        for T in a.tokens:
            if time.time() > deadline:
                rows.append({"E": E, "d": d, "f": f, "tokens": T, "skipped": "time budget (--max-minutes)"})
                log_row(rows[-1])
                continue
            rows += bench_point(E, d, f, T, weights, configs, ceilings, a.skew, a.budget_s, "cuda")
            free_memory()
            write_json(a.out, {"benchmark": "grouped_gemm", "run": run_info(argv), "ceilings": ceilings, "rows": rows})
        del weights
        free_memory()
    write_json(a.out, {"benchmark": "grouped_gemm", "run": run_info(argv), "ceilings": ceilings, "rows": rows})
    print_table(rows)


def print_table(rows):
    print(f"{'shape':>14} {'tokens':>7} {'method':>36} {'fc1 ms':>8} {'fc2 ms':>8} {'x floor':>12} {'speedup':>8} "
          f"{'rel err':>9}")
    for r in rows:
        shape = f"{r['E']}x{r['d']}x{r['f']}"
        if "skipped" in r or "error" in r:
            print(f"{shape:>14} {r['tokens']:>7} {r.get('method', 'skipped'):>36} {r.get('error', '')[:60]}")
            continue
        err = max(r.get("fc1_rel_err_vs_grouped_mm", 0), r.get("fc2_rel_err_vs_grouped_mm", 0))
        print(f"{shape:>14} {r['tokens']:>7} {r['method']:>36} {r['fc1_ms']:>8.3f} {r['fc2_ms']:>8.3f} "
              f"{r['fc1_x_floor']:>5.2f}/{r['fc2_x_floor']:<6.2f} {r['speedup_vs_grouped_mm']:>8.3f} {err:>9.1e}")


if __name__ == "__main__":
    main()
