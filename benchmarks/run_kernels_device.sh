#!/usr/bin/env bash
# One device call (1 H200) for issue #14 item 3: the GPU tests of the fused grouped GEMM and of the
# MoE layer's CUDA graphs, the fused grouped GEMM against torch._grouped_mm + bias_act_rows_, and
# decoding with CUDA graphs against eager. Each step is time-boxed; results and logs go to $1.
# Usage: bash benchmarks/run_kernels_device.sh OUT_DIR
set -u
O=${1:?output folder}; mkdir -p "$O"
step() { local secs=$1 name=$2; shift 2; echo "== $name (max ${secs}s)"; local t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$secs" "$@" > "$O/$name.log" 2>&1; echo "rc=$? after $(( $(date +%s) - t0 ))s"; tail -4 "$O/$name.log"; }
nvidia-smi --query-gpu=name --format=csv,noheader
step "${TEST_S:-140}" gpu_tests python3 -m pytest -q -rA tests/test_gpu.py -k "grouped_linear or cuda_graphs"
step "${GEMM_S:-200}" grouped_gemm python3 benchmarks/bench_grouped_gemm.py --max-minutes "${GEMM_MIN:-2.8}" \
  --out "$O/grouped_gemm_h200.json"
step "${GRAPH_S:-170}" cuda_graphs python3 benchmarks/bench_cuda_graphs.py --sentences 1 8 64 --max-tokens 256 \
  --max-minutes "${GRAPH_MIN:-2.2}" --out "$O/cuda_graphs_generate_h200.json"
ls -la "$O"
