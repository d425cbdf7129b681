"""The end-to-end benchmark's roofline and memory-prediction helpers, against hand computations."""

import pytest

from benchmarks.bench_end_to_end import flops_per_token, predict_peak_GiB


def test_lm_flops_per_token_by_hand():
    # 24 layers, d=1024, f=4096, 512-token blocks, MoE (top-2 of 128, gate d x E) on every 2nd layer, vocab 51,200
    attention = 4 * 1024 * 1024 + 2 * 512 * 1024  # q, k, v, out projections + scores and weighted sum
    dense, moe = 2 * 1024 * 4096, 2 * (2 * 1024 * 4096) + 1024 * 128
    macs = 12 * (attention + dense) + 12 * (attention + moe) + 51200 * 1024
    assert macs == 481_820_672
    assert flops_per_token("lm", "lm-eval", 128, 24) == 2 * macs


def test_mt_encoder_flops_per_token_by_hand():
    d, f = 2048, 8192
    attention = 4 * d * d + 2 * 64 * d
    macs = 9 * (attention + 2 * d * f) + 3 * (attention + 4 * d * f + d * 128)  # MoE on layers 4, 8, 12
    assert flops_per_token("mt", "mt-encoder", 128, 12) == 2 * macs


def test_predicted_peak_memory():
    assert predict_peak_GiB([]) is None and predict_peak_GiB([30.0]) is None
    assert predict_peak_GiB([30.0, 35.0]) == 55.0  # last increment x 4 (quadratic worst case)

    def quadratic(t):
        return 20 + 0.5 * t + 0.25 * t * t

    # exact for memory quadratic in the batch, the last three of doubling batches 1, 2, 4 -> 8
    assert predict_peak_GiB([quadratic(t) for t in (1, 2, 4)]) == pytest.approx(quadratic(8))
    assert predict_peak_GiB([quadratic(t) for t in (0.5, 1, 2, 4)]) == pytest.approx(quadratic(8))
    # measured on the H200 (e2e_lm_h200.json, static 0.25): 8k, 16k tokens fit; 32k ran out of memory
    assert predict_peak_GiB([29.27, 38.02, 73.58]) > 139
    assert predict_peak_GiB([33.12, 41.71, 58.9]) == pytest.approx(93.28, abs=0.1)  # dynamic at 128k: 93.28 GiB
