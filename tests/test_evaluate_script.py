"""scripts/evaluate.py's merging of per-rank MoE statistics (expert-parallel eval-lm), by hand."""

import importlib.util
import json
import os
import sys

from .helpers import REPO


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(REPO, "scripts", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(REPO, "scripts"))  # evaluate.py imports its sibling bleu.py
    spec.loader.exec_module(module)
    return module


def _stats(tokens, routed, dropped, counts, rate, peak, world):
    return {"tokens": tokens, "routed": routed, "dropped": dropped, "wall_tokens_per_s": rate, "world_size": world,
            "peak_accelerator_memory_bytes": peak, "layers": {"decoder.layers.1.moe_layer": {"expert_counts": counts}}}


def test_per_rank_stats_are_summed(tmp_path):
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(_stats(10, 20, 1, [5, 15], 100.0, 7, 2)))
    (tmp_path / "moe.json.rank1").write_text(json.dumps(_stats(6, 12, 2, [4, 8], 50.5, 9, 2)))
    brief = _evaluate_module().moe_brief(str(path))
    assert brief == {"moe_tokens_per_s": 150.5, "moe_dropped": 3, "moe_routed": 32, "peak_accelerator_memory_bytes": 9,
                     "tokens_per_expert": {"decoder.layers.1.moe_layer": [9, 23]}, "ranks": 2}


def test_one_process_stats_pass_through(tmp_path):
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(_stats(10, 20, 1, [5, 15], 100.0, None, None)))
    brief = _evaluate_module().moe_brief(str(path))
    assert brief == {"moe_tokens_per_s": 100.0, "moe_dropped": 1, "moe_routed": 20, "peak_accelerator_memory_bytes": None,
                     "tokens_per_expert": {"decoder.layers.1.moe_layer": [5, 15]}}


def test_missing_rank_file_and_unknown_rate(tmp_path):
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(_stats(10, 20, 1, [5, 15], None, None, 3)))
    (tmp_path / "moe.json.rank2").write_text(json.dumps(_stats(6, 12, 2, [4, 8], 50.5, 9, 3)))
    brief = _evaluate_module().moe_brief(str(path))
    assert brief["ranks_missing"] == [1] and brief["ranks"] == 3
    assert brief["moe_routed"] == 32 and brief["moe_tokens_per_s"] == 50.5 and brief["peak_accelerator_memory_bytes"] == 9


def test_all_ranks_token_count_is_read_from_the_hook_line():
    from fairseq_moe_infer.expert_parallel_eval import ALL_RANKS_LINE

    line = ALL_RANKS_LINE.format(5.6208, 212853, 5.6313, 422517)
    assert _evaluate_module()._ALL_RANKS.search("INFO:fairseq_cli.eval_lm:" + line).group(1) == "422,517"
