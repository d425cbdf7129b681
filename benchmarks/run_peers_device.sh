#!/usr/bin/env bash
# One device call (one H200, <= 9.5 min): install the fairseq wheels, build the peers, run
# benchmarks/bench_peers.py and benchmarks/characterize.py; everything lands in OUT as three files:
#   results.tar.gz  the JSON + PNG results (extract into benchmarks/results/)
#   logs.tar.gz     build logs (peers_build.json: each peer's build/import status and first errors),
#                   bench_peers worker logs, each step's log
#   run.log         this script's own output
# Usage: bash benchmarks/run_peers_device.sh OUT [all|peers|char]
#   all (default): the three steps share the call: peers build (<= BUILD_S), then the time left is split
#   between bench_peers and characterize (PEERS_SHARE, default 0.5); peers / char: one step with the
#   whole call (two calls give each its full time).
# Needs in the repository root: .whl/ (fairseq wheels, scripts/device_wheels.py) and, for peers, .peers/
# (scripts/fetch_peers.py); carry both: carry [".whl", ".peers"]. Env: TOTAL_S (560), BUILD_S (240),
# PEERS_SHARE (0.5), PEER_ARGS / CHAR_ARGS (extra arguments), GIT_COMMIT (recorded in the JSON).
set -u
O=${1:?output folder}; MODE=${2:-all}; mkdir -p "$O"; O=$(cd "$O" && pwd)
T0=$(date +%s); TOTAL=${TOTAL_S:-560}
W=$(mktemp -d /tmp/run_peers.XXXX); mkdir -p "$W/logs"
exec > >(tee "$O/run.log") 2>&1
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
step() { local secs=$1 name=$2; shift 2; echo "== $name (max ${secs}s, $(left)s left)"; local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$secs" "$@" > "$W/logs/$name.log" 2>&1; echo "rc=$? after $(( $(date +%s) - t0 ))s"
  tail -4 "$W/logs/$name.log"; }
finish() { tar czf "$O/logs.tar.gz" -C "$W" logs; ( cd benchmarks/results && tar czf "$O/results.tar.gz" $(ls peers_h200.* char_*_h200.* 2>/dev/null) ); ls -la "$O"; }
trap finish EXIT

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || { echo "no .whl: carry it"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -c "import torch, fairseq; print('torch', torch.__version__, 'fairseq', fairseq.__version__)"

if [ "$MODE" = all ] || [ "$MODE" = peers ]; then
  [ "$MODE" = all ] && B=${BUILD_S:-240} || B=${BUILD_S:-300}
  step $(( B + 40 )) build_peers env BUILD_S=$B SITE=/tmp/site bash benchmarks/build_peers.sh "$W/logs/peers_build"
  cat "$W/logs/peers_build/peers_build.json" 2>/dev/null | head -60
  S=$(left); [ "$MODE" = all ] && S=$(python3 -c "print(int(($S - 20) * ${PEERS_SHARE:-0.5}))") || S=$(( S - 20 ))
  # --max-minutes leaves the step a minute for start-up, the ceilings, weight building and the plot
  ( [ -f /tmp/site/peers_env.sh ] && . /tmp/site/peers_env.sh  # LD_LIBRARY_PATH of the CUDA wheels (build_peers.sh)
    step "$S" bench_peers python3 benchmarks/bench_peers.py --max-minutes "$(python3 -c "print(max(($S - 75) / 60, 0.5))")" \
      --log-dir "$W/logs/bench_peers" --out benchmarks/results/peers_h200.json ${PEER_ARGS:-} )
fi
if [ "$MODE" = all ] || [ "$MODE" = char ]; then
  S=$(( $(left) - 20 ))
  step "$S" characterize python3 benchmarks/characterize.py --figs fig5_6 fig8 fig9 fig10 \
    --max-minutes "$(python3 -c "print(max(($S - 60) / 60, 0.5))")" --out-dir benchmarks/results ${CHAR_ARGS:-}
fi
