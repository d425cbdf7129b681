#!/usr/bin/env bash
# Build and install the peer MoE implementations on the (offline) GPU machine, for benchmarks/bench_peers.py.
#
# Sources: .peers/ from scripts/fetch_peers.py (PyPI sdists of megablocks, stanford-stk, grouped_gemm,
# deepspeed; a git archive of microsoft/tutel; wheels of DeepSpeed's pure-Python needs). Nothing is
# downloaded here: pip runs with --no-index --no-build-isolation against the machine's own torch/nvcc.
# All builds start at once (each peer's CUDA extension is one or two nvcc jobs), each time-boxed; each
# peer's full output goes to LOG/build_<peer>.log and its status, with the first error lines of a
# failed build or import, to LOG/peers_build.json. Installs into $SITE: add it to PYTHONPATH.
#
# Usage: bash benchmarks/build_peers.sh LOG_DIR
#   env: SITE (/tmp/site), PEERS (.peers), BUILD_S (seconds per build, 330), MAX_JOBS (16),
#        TORCH_CUDA_ARCH_LIST (9.0), GROUPED_GEMM_CUTLASS (unset: grouped_gemm's default cuBLAS path)
#
# MegaBlocks 0.10.0's csrc/cumsum.h passes cub's removed `debug_synchronous` argument, which CUDA 13's
# CUB (CCCL 3) no longer accepts ("no instance of overloaded function cub::DeviceScan::ExclusiveSum");
# it is built as published and, beside it, with that one argument dropped ("megablocks_cuda13fix");
# the published build is installed when it succeeds, else the fixed one, and the JSON says which.
set -u
LOG=${1:?log folder}; mkdir -p "$LOG"; LOG=$(cd "$LOG" && pwd); HERE=$(cd "$(dirname "$0")" && pwd)
SITE=${SITE:-/tmp/site}; PEERS=$(cd "${PEERS:-.peers}" && pwd) || { echo "no ${PEERS:-.peers}: run scripts/fetch_peers.py"; exit 1; }
BUILD_S=${BUILD_S:-330}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} DS_BUILD_OPS=0 PIP_NO_INDEX=1
W=$(mktemp -d /tmp/peer_build.XXXX); mkdir -p "$SITE" "$W/wheels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
pip_q() { python3 -m pip "$@" --no-index --no-deps --disable-pip-version-check; }

# DeepSpeed's pure-Python needs that the image lacks
pip_q install -q --no-compile --upgrade --target "$SITE" "$PEERS"/wheels/*.whl > "$LOG/build_wheels.log" 2>&1 \
  || echo "installing .peers/wheels failed: see $LOG/build_wheels.log"

# CUDA headers/libraries of the pip wheels beside torch, for a toolkit that lacks some (peer_cuda_env.py says
# which and why); $SITE/peers_env.sh sets LD_LIBRARY_PATH likewise for the runs. build_env.log: what was found.
eval "$(python3 "$HERE/peer_cuda_env.py" "$W/cuda_links" "$SITE/peers_env.sh")"
NVCC_INC="$(dirname "$(dirname "$(command -v nvcc)")")/include"
{ echo "CUDA_HOME (torch): $(python3 -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME)')"
  echo "nvcc: $(command -v nvcc): $(nvcc --version | tail -1)"
  echo "CPATH=$CPATH"; echo "LIBRARY_PATH=$LIBRARY_PATH"; ls -la "$W/cuda_links"
  for h in cuda_runtime.h cub/cub.cuh cublas_v2.h cusparse.h nvrtc.h nccl.h; do
    printf '%s: ' "$h"; echo "#include <$h>" > "$W/probe.cu"
    nvcc -E "$W/probe.cu" -o /dev/null -I"$NVCC_INC" > /dev/null 2>&1 && echo found || echo MISSING
  done; } > "$LOG/build_env.log" 2>&1

unpack() {  # unpack TARBALL into $W/src/NAME, print the source folder
  local name=$1 tarball=$2; mkdir -p "$W/src/$name"; tar xzf "$tarball" -C "$W/src/$name"
  find "$W/src/$name" -mindepth 1 -maxdepth 1 -type d | head -1
}

build() {  # build NAME TARBALL [fix]: a wheel into $W/wheels/NAME, time-boxed; status in $W/rc_NAME
  local name=$1 tarball=$2 fix=${3:-} src t0 rc
  t0=$(date +%s)
  src=$(unpack "$name" "$tarball")
  if [ "$fix" = cuda13 ]; then  # drop cub's removed debug_synchronous argument (CCCL 3)
    perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$src/csrc/cumsum.h"
  fi
  mkdir -p "$W/wheels/$name"
  ( cd "$src" && timeout --signal=INT --kill-after=10 "$BUILD_S" \
      python3 -m pip wheel -v --no-index --no-deps --no-build-isolation --disable-pip-version-check -w "$W/wheels/$name" . )
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$W/rc_$name"
}

[ -n "$(ls "$PEERS"/tutel-*.tar.gz 2>/dev/null)" ] && build tutel "$(ls "$PEERS"/tutel-*.tar.gz | head -1)" > "$LOG/build_tutel.log" 2>&1 &
build grouped_gemm "$PEERS"/grouped_gemm-*.tar.gz > "$LOG/build_grouped_gemm.log" 2>&1 &
build megablocks "$PEERS"/megablocks-*.tar.gz > "$LOG/build_megablocks.log" 2>&1 &
build megablocks_cuda13fix "$PEERS"/megablocks-*.tar.gz cuda13 > "$LOG/build_megablocks_cuda13fix.log" 2>&1 &
build stanford_stk "$PEERS"/stanford_stk-*.tar.gz > "$LOG/build_stanford_stk.log" 2>&1 &
build deepspeed "$PEERS"/deepspeed-*.tar.gz > "$LOG/build_deepspeed.log" 2>&1 &
wait

for name in tutel grouped_gemm stanford_stk deepspeed; do
  ls "$W/wheels/$name"/*.whl > /dev/null 2>&1 && pip_q install -q --no-compile --upgrade --target "$SITE" "$W/wheels/$name"/*.whl \
    >> "$LOG/build_$name.log" 2>&1
done
MEGABLOCKS_BUILD=none
for name in megablocks megablocks_cuda13fix; do
  if ls "$W/wheels/$name"/*.whl > /dev/null 2>&1; then
    pip_q install -q --no-compile --upgrade --target "$SITE" "$W/wheels/$name"/*.whl >> "$LOG/build_$name.log" 2>&1
    MEGABLOCKS_BUILD=$name; break
  fi
done

# status of each build and import, with the first error lines: LOG/peers_build.json
W="$W" LOG="$LOG" MEGABLOCKS_BUILD="$MEGABLOCKS_BUILD" python3 - <<'EOF'
import json, os, re, subprocess, sys
W, LOG = os.environ["W"], os.environ["LOG"]
imports = {"tutel": "from tutel import moe", "grouped_gemm": "import grouped_gemm.ops",
           "stanford_stk": "import stk.ops", "deepspeed": "from deepspeed.moe.layer import MoE",
           "megablocks": "from megablocks.layers.dmoe import dMoE; import megablocks_ops"}
out = {"megablocks_installed_build": os.environ["MEGABLOCKS_BUILD"]}
for name in ["tutel", "grouped_gemm", "megablocks", "megablocks_cuda13fix", "stanford_stk", "deepspeed"]:
    st = {}
    rc_file = os.path.join(W, "rc_" + name)
    if not os.path.exists(rc_file):
        st["build"] = "not attempted (source missing from .peers)"
    else:
        rc, secs = open(rc_file).read().split()
        st["build_rc"], st["build_seconds"] = int(rc), int(secs)
        st["build"] = "ok" if rc == "0" else ("timed out" if rc in ("124", "130", "137") else "failed")
        if rc != "0":
            log = open(os.path.join(LOG, f"build_{name}.log"), errors="replace").read().splitlines()
            errs = [line.strip() for line in log if re.search(r"\berror\b|Error:|error:", line)]
            st["first_errors"] = errs[:12] or log[-12:]
    if name in imports:
        p = subprocess.run([sys.executable, "-c", imports[name]], capture_output=True, text=True)
        st["import"] = "ok" if p.returncode == 0 else "failed"
        if p.returncode:
            st["import_error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
    out[name] = st
    print(name, json.dumps(st)[:400])
json.dump(out, open(os.path.join(LOG, "peers_build.json"), "w"), indent=1)
EOF
rm -rf "$W"
