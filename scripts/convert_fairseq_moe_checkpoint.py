#!/usr/bin/env python3
"""Convert a checkpoint of fairseq's MoE branch (``<name>-shared.pt`` + ``<name>-rank-<r>.pt``)
into this plugin's layout, loadable by the stock tools with ``--user-dir`` and ``--path``.

The branch's stored MoE settings are carried into the config and applied whenever the ``moe_*`` tasks
load the result (logged): ``use_moe_pad_mask`` (padding routed unless the branch used --use-moe-pad-mask),
the capacity factor, the MoE-layer frequency (the branch's max(encoder/decoder_moe_freq, moe_freq)) and the
evaluation capacity fraction; ``--moe-eval-capacity-token-fraction`` (and ``--model-overrides`` for the model
settings) given on the command line win. The printed ``eval_args`` are the flag equal to the stored fraction.

Example:
    python scripts/convert_fairseq_moe_checkpoint.py moe_lm/model-shared.pt --out serve/checkpoint.pt --expert-shards 4
    fairseq-eval-lm data-bin --user-dir $(python -m fairseq_moe_infer) --task moe_language_modeling \\
        --path serve/checkpoint.pt --moe-gating dynamic
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quiet import configure_logging  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shared", help="the MoE branch's <name>-shared.pt (rank files must be beside it)")
    p.add_argument("--out", required=True, help="path of the converted main file")
    p.add_argument("--expert-shards", type=int, default=0, help="expert shard files to write (0: experts in the main file)")
    p.add_argument("--verbose", action="store_true", help="also show fairseq's import-time log lines")
    a = p.parse_args(argv)
    configure_logging(a.verbose)
    # after configure_logging: fairseq is imported here
    from fairseq_moe_infer.checkpoint import CheckpointError, branch_eval_args, convert_fairseq_moe_branch
    try:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        written = convert_fairseq_moe_branch(a.shared, a.out, a.expert_shards)
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"convert_fairseq_moe_checkpoint.py: error: {e}") from None
    import torch

    with open(a.out, "rb") as f:
        settings = torch.load(f, map_location="cpu", weights_only=False)["extra_state"]["fairseq_moe_branch"]
    print(json.dumps({"files": {os.path.basename(w): os.path.getsize(w) for w in written},
                      "branch_settings": settings, "eval_args": branch_eval_args(settings)}))


if __name__ == "__main__":
    main()
