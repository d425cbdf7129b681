#!/usr/bin/env bash
# One device call (1 H200) for the expert-buffering measurements of issue #11 that need a GPU:
# miss handling (prefetch, CPU experts) on the paper-sized replay and through fairseq-generate,
# repeated timings of the K = E/4 goal at 1 sentence, and GPU memory over 2,500 sentences (to set
# beside the committed 10,000-sentence run). Each step is time-boxed; results and logs go to $1.
# Usage: bash benchmarks/run_buffering_device.sh OUT_DIR
set -u
O=${1:?output folder}; mkdir -p "$O"
step() { local secs=$1 name=$2; shift 2; echo "== $name (max ${secs}s)"; local t0=$(date +%s)
  timeout --signal=INT --kill-after=5 "$secs" "$@" > "$O/$name.log" 2>&1; echo "rc=$? after $(( $(date +%s) - t0 ))s"; tail -3 "$O/$name.log"; }
nvidia-smi --query-gpu=name --format=csv,noheader
step 120 memory_growth_2500 python3 benchmarks/memory_growth.py --device cuda --sentences 2500 --batch-size 128 \
  --out "$O/memory_growth_h200_2500.json" -- --moe-expert-buffer-size 4 --moe-buffer-policy lifo --moe-gating dynamic
step "${REPLAY_S:-270}" replay_prefetch python3 benchmarks/bench_end_to_end.py --model mt --workloads mt-replay \
  --replay-sentences 1 8 --replay-repeat 3 --replay-fractions 4 1 --replay-policies lifo \
  --replay-prefetch none previous-step --replay-cpu-experts off auto \
  --replay-trace benchmarks/results/traces/mt_moe128/de_b16.npz --max-minutes "${REPLAY_MIN:-4.2}" \
  --out "$O/e2e_mt_replay_prefetch_h200.json"
step "${GENERATE_S:-170}" prefetch_generate python3 benchmarks/prefetch_generate.py --device cuda --fp16 --repeat 3 \
  --configs none:off previous-step:off gate:off none:auto gate:auto --out "$O/prefetch_generate_h200.json"
ls -la "$O"
