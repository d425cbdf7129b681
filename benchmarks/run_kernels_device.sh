#!/usr/bin/env bash
# One device call (1 H200) for issue #14 item 3 (the GPU tests of the fused grouped GEMM, the layer
# using it at small groups, the MoE layer's CUDA graphs; the layer alone at small batches, eager and
# graph; decoding with CUDA graphs against eager) and, with ISSUE11=1, the rest of issue #11's GPU
# measurements (Python heap over a long buffered run; miss handling through fairseq-generate).
# Each step is time-boxed; results and logs go to $1.   Usage: bash benchmarks/run_kernels_device.sh OUT_DIR
set -u
O=${1:?output folder}; mkdir -p "$O"
step() { local secs=$1 name=$2; shift 2; echo "== $name (max ${secs}s)"; local t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$secs" "$@" > "$O/$name.log" 2>&1; echo "rc=$? after $(( $(date +%s) - t0 ))s"; tail -4 "$O/$name.log"; }
nvidia-smi --query-gpu=name --format=csv,noheader
step "${TEST_S:-120}" gpu_tests python3 -m pytest -q -rA tests/test_gpu.py \
  -k "${TEST_K:-grouped_linear or cuda_graphs or captures or fused_kernels or static_equals_dynamic or grouped_mm_matches or buffering_on_gpu}"
step "${LAYER_S:-100}" moe_layer python3 benchmarks/bench_moe_layer.py --policies dynamic dynamic-graph --shapes 64x1024x4096 128x1024x4096 \
  128x2048x8192 --tokens ${LAYER_TOKENS:-512 4096 32768} --budget-s 0.8 --max-minutes 1.3 --out "$O/moe_layer_small_h200.json"
step "${GRAPH_S:-100}" cuda_graphs python3 benchmarks/bench_cuda_graphs.py --sentences 1 8 64 --max-tokens 256 --repeat 5 \
  --max-minutes 1.4 --out "$O/cuda_graphs_generate_h200.json"
if [ -n "${ISSUE11:-}" ]; then
  [ -z "${SKIP_HEAP:-}" ] && step 110 memory_python_heap python3 benchmarks/memory_growth.py --device cuda --sentences 5000 --batch-size 128 --python-heap \
    --out "$O/memory_growth_h200_python_heap.json" -- --moe-expert-buffer-size 4 --moe-buffer-policy lifo --moe-gating dynamic
  step "${PREFETCH_S:-130}" prefetch_generate python3 benchmarks/prefetch_generate.py --device cuda --fp16 --repeat 1 \
    --configs none:off previous-step:off gate:off none:auto --out "$O/prefetch_generate_h200.json"
fi
ls -la "$O"
