#!/usr/bin/env python3
"""Where does the dynamic MoE layer's time go? Kernel table and a grouped-GEMM layout check.

1. ``torch._grouped_mm`` on the same expert weights stored two ways: ``nn.Linear``
   layout [E, f, d] passed transposed (what :class:`Experts` does) and [E, d, f]
   contiguous; median times and the time of reading the weights once at the
   measured copy rate.
2. ``torch.profiler`` over dynamic forwards: CUDA time per kernel, top rows.

Example:
    python benchmarks/profile_dynamic.py --out benchmarks/results/profile_dynamic_h200.json
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import measure_ceilings, run_info, time_cuda, write_json  # noqa: E402
from fairseq_moe_infer.moe import MoELayer  # noqa: E402


def layout_check(E, d, f, T, ceilings):
    counts = torch.full((E,), 2 * T // E, device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(2 * T, d, device="cuda", dtype=torch.bfloat16)
    w_linear = torch.randn(E, f, d, device="cuda", dtype=torch.bfloat16)  # [E, out, in]
    w_dense = w_linear.transpose(1, 2).contiguous()  # [E, in, out]
    t_lin = time_cuda(lambda i: torch._grouped_mm(x, w_linear.transpose(1, 2), offs=offs), 3, 10)["median_ms"]
    t_den = time_cuda(lambda i: torch._grouped_mm(x, w_dense, offs=offs), 3, 10)["median_ms"]
    read_ms = 1000 * w_linear.numel() * 2 / (ceilings["copy_GBps_read_plus_write"] * 1e9)
    flop_ms = 1000 * 2 * 2 * T * d * f / (ceilings["bf16_matmul_tflops"] * 1e12)
    return {"E": E, "d": d, "f": f, "rows": 2 * T, "linear_layout_transposed_ms": t_lin,
            "in_out_contiguous_ms": t_den, "weight_read_floor_ms": read_ms, "flop_floor_ms": flop_ms}


def kernel_table(E, d, f, T, top=15):
    torch.manual_seed(0)
    layer = MoELayer(d, f, E, k=2, gating="dynamic").cuda().to(torch.bfloat16).eval()
    xs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        for i in range(3):
            layer(xs[i])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for i in range(5):
                layer(xs[i % 3])
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        cuda_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if cuda_us > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"kernel": ev.key[:120], "cuda_ms_per_forward": cuda_us / 1000 / 5, "calls_per_forward": ev.count / 5})
    rows.sort(key=lambda r: -r["cuda_ms_per_forward"])
    cpu_total = sum(ev.self_cpu_time_total for ev in prof.key_averages()) / 1000 / 5
    return {"E": E, "d": d, "f": f, "tokens": T, "cpu_ms_per_forward": cpu_total, "kernels": rows[:top],
            "gpu_kernel_ms_per_forward": sum(r["cuda_ms_per_forward"] for r in rows)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    ceilings = measure_ceilings()
    layouts = [layout_check(64, 1024, 4096, 4096, ceilings), layout_check(128, 2048, 8192, 32768, ceilings)]
    tables = [kernel_table(64, 1024, 4096, 4096), kernel_table(128, 2048, 8192, 32768)]
    write_json(a.out, {"benchmark": "profile_dynamic", "run": run_info(), "ceilings": ceilings,
                       "grouped_mm_layout": layouts, "kernel_tables": tables})
    for r in layouts:
        print(r)
    for t in tables:
        print(f"E={t['E']} T={t['tokens']}: gpu kernels {t['gpu_kernel_ms_per_forward']:.3f} ms, "
              f"cpu {t['cpu_ms_per_forward']:.3f} ms")
        for k in t["kernels"][:10]:
            print(f"  {k['cuda_ms_per_forward']:8.3f} ms  x{k['calls_per_forward']:.0f}  {k['kernel'][:90]}")


if __name__ == "__main__":
    main()
