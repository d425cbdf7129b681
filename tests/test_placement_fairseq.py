"""``--moe-placement`` in the stock fairseq tools: same scores and hypotheses as without it.

fairseq-eval-lm with the bundled LM (16 experts, MoE layers decoder.layers.1 and .3) on 1 and
2 gloo processes (4 in the slow set) with maps that replicate experts, against one process with
the contiguous sharding; fairseq's beam search (fairseq-interactive, the same SequenceGenerator
as fairseq-generate) on one process with a world-size-1 map holding replicas against no map;
a map for another world size ends the tool with one line.
"""

import json
import os
import re
import subprocess

import pytest

from fairseq_moe_infer.moe.placement import Placement

from .helpers import ASSETS, USER_DIR, free_port, ok, run, tool

LM_LAYERS = ["decoder.layers.1.moe_layer", "decoder.layers.3.moe_layer"]
MT_LAYERS = ["encoder.layers.1.moe_layer", "encoder.layers.3.moe_layer"] + LM_LAYERS


def _map(tmp_path, world, slots, layers, name):
    """A valid map with replicas: layer i holds experts in a shifted order, spare slots repeat
    the first experts of that order."""
    plans = {}
    for i, layer in enumerate(layers):
        order = [(5 * e + 3 * i + 1) % 16 for e in range(16)]
        plans[layer] = (order + order)[: world * slots]
    path = tmp_path / f"{name}.json"
    Placement(world, slots, 16, plans).save(str(path))
    return str(path)


def _eval_lm(tmp_path, name, world, placement=None):
    args = [os.path.join(ASSETS, "lm"), "--path", os.path.join(ASSETS, "checkpoints", "lm_moe", "checkpoint.pt"),
            "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--gen-subset", "test1",
            "--tokens-per-sample", "256", "--max-tokens", "2560", "--cpu", "--moe-gating", "dynamic",
            "--moe-stats-json", str(tmp_path / f"{name}.json")] + (["--moe-placement", placement] if placement else [])
    if world == 1:
        return [subprocess.Popen(tool("eval-lm") + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    port = free_port()
    return [subprocess.Popen(tool("eval-lm") + args + [
        "--distributed-world-size", str(world), "--distributed-rank", str(r), "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _perplexities(runs):
    out = {}
    for name, procs in runs.items():
        texts = [p.communicate(timeout=900)[0] for p in procs]
        for p, text in zip(procs, texts):
            assert p.returncode == 0, text[-3000:]
        out[name] = float(re.search(r"Perplexity: ([0-9.]+)", texts[0]).group(1))
    return out


def _check_gpu_load(tmp_path, name, world, slots):
    s = json.loads((tmp_path / f"{name}.json").read_text())
    for layer in LM_LAYERS:
        g = s["layers"][layer]["gpu_load"]
        assert g["world_size"] == world and g["slots_per_gpu"] == slots
        assert sum(g["tokens_per_gpu"]) == 2 * 15922  # every routed top-2 choice of all ranks, on some GPU
        assert g["step_max_over_mean"] >= 1.0 and g["batches"] >= 1


@pytest.mark.slow
def test_eval_lm_with_replicated_placements_equals_contiguous(tmp_path):
    runs = {"one": _eval_lm(tmp_path, "one", 1),
            "one_placed": _eval_lm(tmp_path, "one_placed", 1, _map(tmp_path, 1, 20, LM_LAYERS, "w1")),
            "two_placed": _eval_lm(tmp_path, "two_placed", 2, _map(tmp_path, 2, 9, LM_LAYERS, "w2"))}
    ppl = _perplexities(runs)
    assert ppl["one"] == ppl["one_placed"] == ppl["two_placed"], ppl
    _check_gpu_load(tmp_path, "two_placed", 2, 9)


@pytest.mark.slow
def test_four_process_eval_lm_with_placement_equals_one_process(tmp_path):
    runs = {"one": _eval_lm(tmp_path, "one", 1),
            "four_placed": _eval_lm(tmp_path, "four_placed", 4, _map(tmp_path, 4, 5, LM_LAYERS, "w4"))}
    ppl = _perplexities(runs)
    assert ppl["one"] == ppl["four_placed"], ppl
    _check_gpu_load(tmp_path, "four_placed", 4, 5)


def _generate(extra):
    """fairseq-interactive (fairseq-generate's search on stdin lines) on 15 Multi30k sentences, 5 per language."""
    with open(os.path.join(ASSETS, "mt", "raw", "test_2016_flickr.en.txt"), encoding="utf-8") as f:
        src = [line.strip() for line in f][:15]
    lines = "".join(f"<2{lang}> {s}\n" for lang, s in zip(["de", "fr", "cs"] * 5, src))
    args = [os.path.join(ASSETS, "mt"), "--user-dir", USER_DIR, "--task", "moe_translation",
            "--path", os.path.join(ASSETS, "checkpoints", "mt_moe", "checkpoint.pt"), "--source-lang", "src",
            "--target-lang", "tgt", "--bpe", "sentencepiece", "--sentencepiece-model",
            os.path.join(ASSETS, "mt", "spm.model"), "--beam", "4", "--buffer-size", "15", "--batch-size", "15",
            "--cpu", "--moe-gating", "dynamic"] + extra
    return run("interactive", args, stdin=lines)


@pytest.mark.slow
def test_generate_with_a_replicated_placement_gives_the_same_hypotheses(tmp_path):
    ref = ok(_generate([]))
    got = ok(_generate(["--moe-placement", _map(tmp_path, 1, 24, MT_LAYERS, "mt")]))
    hyps = [re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", t, re.M) for t in (ref, got)]
    assert len(hyps[0]) == 15
    assert [(i, text) for i, _, text in hyps[0]] == [(i, text) for i, _, text in hyps[1]]  # identical hypotheses
    # scores: float32 expert GEMMs over other row groupings round differently in the last bits
    for (_, a, _), (_, b, _) in zip(*hyps):
        assert float(a) == pytest.approx(float(b), abs=1e-5)


def test_a_map_for_another_world_size_ends_the_tool_with_one_line(tmp_path):
    proc = _generate(["--moe-placement", _map(tmp_path, 2, 8, MT_LAYERS, "w2")])
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert last.startswith("fairseq-interactive: error: --moe-placement is for world size 2, this run has 1"), last
