#!/usr/bin/env bash
# Train MT MoE models with many experts (64 and 128 per layer) on the bundled Multi30k data, one per
# GPU at the same time, then record their routing on the test sets with --moe-record-trace.
# The traces (not the weights) are what the buffering and placement studies replay.
# On 2 H200s (2026-12-01, RECORD_TIMEOUT=235, 3.6 min of training): E=64 reached 1,803 updates, E=128 1,478
# (en-de BLEU 33.8 / 33.7), and all twelve recordings finished inside the timeout; the whole call took 490 s
# (benchmarks/results/mt_moe64_moe128_h200.json). A recording stopped by its timeout (SIGTERM) still writes
# the calls it recorded (trace header complete=false: read it with --allow-incomplete /
# --replay-allow-incomplete).
# Usage (on a 2-GPU machine, from the repository root, data-bin/mt made by scripts/prepare_mt.py):
#   RECORD_TIMEOUT=260 bash benchmarks/train_record_traces.sh OUT_DIR [TRAIN_MINUTES]
set -uo pipefail
OUT=${1:?output folder}; MIN=${2:-3.8}
mkdir -p "$OUT/traces"
HOURS=$(python3 -c "print(round($MIN/60, 4))")
train() {  # $1 experts, $2 gpu
  CUDA_VISIBLE_DEVICES=$2 python3 -m fairseq_cli.train data-bin/mt --user-dir fairseq_moe_infer \
    --task moe_translation --arch transformer_moe_small --source-lang src --target-lang tgt \
    --criterion moe_label_smoothed_cross_entropy --label-smoothing 0.1 --weight-decay 0.0001 \
    --moe-expert-count "$1" --max-tokens 16384 --moe-gating dynamic --optimizer adam --adam-betas '(0.9,0.98)' \
    --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 600 --dropout 0.3 --attention-dropout 0.1 --fp16 \
    --moe-gating-use-fp32 --seed 1 --num-workers 2 --log-format simple --log-interval 200 --no-epoch-checkpoints \
    --validate-interval 1000 --save-interval-updates 100000 --max-update 100000 --stop-time-hours "$HOURS" \
    --save-dir "/tmp/ck/mt_moe$1" > "$OUT/train_moe$1.log" 2>&1
}
record() {  # $1 experts, $2 gpu, $3 split, $4 beam, $5 batch size, $6 name, extra args...
  local e=$1 g=$2 split=$3 beam=$4 bsz=$5 name=$6; shift 6
  CUDA_VISIBLE_DEVICES=$g timeout "${RECORD_TIMEOUT:-260}" python3 -m fairseq_cli.generate data-bin/mt --user-dir fairseq_moe_infer \
    --task moe_translation --source-lang src --target-lang tgt --path "/tmp/ck/mt_moe$e/checkpoint_last.pt" \
    --gen-subset "$split" --beam "$beam" --batch-size "$bsz" --required-batch-size-multiple 1 --fp16 \
    --post-process sentencepiece --moe-gating dynamic --moe-record-trace "$OUT/traces/mt_moe${e}_${name}.npz" \
    "$@" > "$OUT/gen_moe${e}_${name}.log" 2>&1
  echo "E=$e $name rc=$? $(grep -h 'BLEU' "$OUT/gen_moe${e}_${name}.log" | tail -1)"
}
pipeline() {  # $1 experts, $2 gpu: train, then record all sets at once (the GPU has room for all)
  train "$1" "$2"; echo "train E=$1 rc=$? $(grep '| valid |' "$OUT/train_moe$1.log" | tail -1)"
  record "$1" "$2" test 5 16 de_b16 & record "$1" "$2" test1 5 16 fr_b16 & record "$1" "$2" test2 5 16 cs_b16 &
  record "$1" "$2" valid 5 16 valid_b16 & record "$1" "$2" test 4 64 de_beam4_b64 & record "$1" "$2" test 4 8 de_beam4_b8 & wait
}
pipeline 64 0 & pipeline 128 1 & wait
