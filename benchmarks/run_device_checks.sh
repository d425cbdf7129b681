#!/usr/bin/env bash
# One device call (2 H200s) checking this session's GPU paths and measuring the new capabilities.
# Each step is time-boxed so the call ends inside the device tool's 10-minute limit; results go to $1.
# Usage: bash benchmarks/run_device_checks.sh OUT_DIR
set -u
O=${1:?output folder}; mkdir -p "$O"
step() { local secs=$1 name=$2; shift 2; echo "== $name (max ${secs}s)"; local t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$secs" "$@" > "$O/$name.log" 2>&1; echo "rc=$? after $(( $(date +%s) - t0 ))s"; tail -3 "$O/$name.log"; }
nvidia-smi --query-gpu=name --format=csv,noheader
# 1. GPU tests: buffered store on the GPU (pinned memory, side stream), fp16 EP resume, the earlier GPU tests
step "${GPU_TEST_S:-110}" gpu_tests python3 -m pytest -q -x tests/test_gpu.py tests/test_kernels.py ${GPU_TEST_K:+-k "$GPU_TEST_K"}
# 2. expert buffering on the NLLB-shaped model (E=128, d=2048, f=8192) replaying the bundled MT model's en-de routing
step "${REPLAY_S:-120}" replay python3 benchmarks/bench_end_to_end.py --model mt --workloads mt-replay --replay-sentences 1 8 \
  --replay-repeat 1 --replay-policies lifo lfu belady --replay-fractions 16 4 1 \
  --replay-trace benchmarks/results/traces/mt_en-de.npz --max-minutes "${REPLAY_MIN:-1.7}" --out "$O/e2e_mt_replay_h200.json"
# 3. expert placement on 2 GPUs: contiguous vs greedy vs replicate replaying a traced decoder layer
step 50 placement torchrun --nproc-per-node 2 benchmarks/bench_placement.py --trace benchmarks/results/traces/mt_en-de.npz \
  --layer decoder.layers.1.moe_layer --calls 120 --repeat 3 --out "$O/placement_2xh200.json"
[ -n "${SKIP_GENERATE:-}" ] && { ls -la "$O"; exit 0; }
# 4. expert-parallel fairseq-generate of the NLLB-shaped model, 1 vs 2 GPUs
step 150 generate_ep python3 benchmarks/bench_generate_ep.py --world-sizes 1 2 --batch 256 --batches 3 --timeout 70 \
  --workdir /tmp/gen_ep --out "$O/generate_ep_2xh200.json"
ls -la "$O"
