#!/usr/bin/env python3
"""Turn fairseq training checkpoints into a serving checkpoint.

Averages the given checkpoints, casts weights to fp16, drops optimizer state and,
with ``--expert-shards N``, moves the experts into N shard files beside the main
file (fairseq MoE's layout: shared parameters + expert shards). The result loads
with the stock tools: ``fairseq-generate --user-dir ... --path OUT``.

Example:
    python scripts/export_checkpoint.py checkpoints/mt_moe/checkpoint_*_*.pt \
        --out assets/checkpoints/mt_moe/checkpoint.pt --expert-shards 2
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quiet import configure_logging  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="fairseq checkpoints to average (one: just convert)")
    p.add_argument("--out", required=True, help="path of the main output file")
    p.add_argument("--expert-shards", type=int, default=0, help="expert shard files to write (0: none)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="weight dtype")
    p.add_argument("--verbose", action="store_true", help="also show fairseq's import-time log lines")
    a = p.parse_args(argv)
    configure_logging(a.verbose)
    # after configure_logging: fairseq is imported here
    from fairseq_moe_infer.checkpoint import CheckpointError, export_checkpoint
    if a.expert_shards < 0:
        p.error("--expert-shards must be >= 0")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        written = export_checkpoint(a.checkpoints, a.out, a.expert_shards, getattr(torch, a.dtype))
    except (CheckpointError, ValueError, OSError) as e:  # a missing or bad input, shards not dividing the experts
        raise SystemExit(f"export_checkpoint.py: error: {e}") from None
    sizes = {os.path.basename(w): os.path.getsize(w) for w in written}
    for name, size in sizes.items():
        print(f"wrote {name}: {size / 2**20:.1f} MiB", file=sys.stderr)
    print(json.dumps({"averaged": len(a.checkpoints), "files": sizes}))


if __name__ == "__main__":
    main()
