"""The bundled MoE checkpoints load with the stock tools and still translate and model language.

Thresholds were measured on the bundled 50-line test slices (CPU, beam 5, dynamic
gating): en-de 42.65, en-fr 55.51, en-cs 31.53 BLEU (MT model of session 3); perplexity 25.59 (Multi30k),
56.34 (Shakespeare), 48.45 (WikiText-2). A broken layer falls far below them.
"""

import json
import os
import subprocess
import sys

import pytest

from .helpers import ASSETS, REPO, TINY_LM, TINY_MT

BLEU_AT_LEAST = {"en-de": 40.0, "en-fr": 53.0, "en-cs": 29.0}
PERPLEXITY_AT_MOST = {"multi30k": 28.0, "shakespeare": 62.0, "wikitext2": 53.0}


def _evaluate(tmp_path, *flags):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--mt-data", TINY_MT,
                           "--lm-data", TINY_LM, "--out-dir", str(tmp_path), *flags], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn")
    return _evaluate(out), out


@pytest.fixture(scope="module")
def dynamic_results(dynamic_run):
    return dynamic_run[0]


def test_main_job_writes_its_report_page(dynamic_run):
    results, out = dynamic_run
    assert json.loads((out / "results.json").read_text()) == results
    report = (out / "report.md").read_text()
    for pair, r in results["translation"].items():
        assert f"| {pair} | **{r['bleu']:.2f}** | {r['chrf']:.2f} | 50 |" in report
    for name, r in results["language_model"].items():
        assert f"| {name} | **{r['perplexity']:.2f}** |" in report
    assert "![tokens per expert](tokens_per_expert.png)" in report
    assert (out / "tokens_per_expert.png").read_bytes()[:4] == b"\x89PNG"


def test_bundled_checkpoints_are_sharded_and_small():
    for name in ("mt_moe", "lm_moe"):
        folder = os.path.join(ASSETS, "checkpoints", name)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
        assert files == ["checkpoint.experts-0-of-2.pt", "checkpoint.experts-1-of-2.pt", "checkpoint.pt"]
        assert all(os.path.getsize(os.path.join(folder, f)) < 25 * 2**20 for f in files)


def test_bundled_translation_reaches_measured_bleu(dynamic_results):
    mt = dynamic_results["translation"]
    for pair, bar in BLEU_AT_LEAST.items():
        assert mt[pair]["sentences"] == 50
        assert mt[pair]["bleu"] >= bar, (pair, mt[pair]["bleu"])
        assert mt[pair]["moe_dropped"] == 0
        assert "case:mixed" in mt[pair]["signature"] and "tok:13a" in mt[pair]["signature"]


def test_bundled_lm_perplexity_under_threshold(dynamic_results):
    lm = dynamic_results["language_model"]
    for name, bar in PERPLEXITY_AT_MOST.items():
        assert lm[name]["perplexity"] <= bar, (name, lm[name]["perplexity"])
        counts = lm[name]["tokens_per_expert"]
        assert len(counts) == 2 and all(len(c) == 16 for c in counts.values())


def test_static_without_drops_matches_dynamic_on_bundled_models(dynamic_results, tmp_path):
    static = _evaluate(tmp_path, "--moe-gating", "static", "--moe-eval-capacity-token-fraction", "1.0", "--langs", "de",
                       "--lm-sets", "multi30k")
    assert static["translation"]["en-de"]["bleu"] == dynamic_results["translation"]["en-de"]["bleu"]
    assert static["language_model"]["multi30k"]["perplexity"] == dynamic_results["language_model"]["multi30k"]["perplexity"]
    assert static["translation"]["en-de"]["moe_dropped"] == 0
