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


def test_mt_generate_flops_per_generated_token_by_hand():
    # per sentence: the 64-token source through the encoder; 4 hypotheses x 32 decoder steps (self-attention
    # over the t-token prefix, cross-attention over 64 source tokens, output projection 32k); the cross-attention
    # keys/values of the 64 source tokens once per hypothesis; divided by the 32 generated tokens
    d, f, layers, src, beam, n, vocab = 2048, 8192, 12, 64, 4, 32, 32000
    moe_layers = {3, 7, 11}  # every 4th layer, 0-based

    def ffn(i):
        return 2 * 2 * d * f + d * 128 if i in moe_layers else 2 * d * f

    encoder_token = sum(4 * d * d + 2 * src * d + ffn(i) for i in range(layers))
    step = 0
    for t in range(1, n + 1):
        for i in range(layers):
            step += (4 * d * d + 2 * t * d) + (2 * d * d + 2 * src * d) + ffn(i)
        step += vocab * d
    cross_kv = layers * src * 2 * d * d
    macs = (src * encoder_token + beam * step + beam * cross_kv) / n
    assert flops_per_token("mt", "mt-generate", 128, 12) == pytest.approx(2 * macs, rel=1e-12)


def test_oom_marks_records_out_of_memory_and_passes_other_errors():
    import torch

    from benchmarks.common import oom_marks

    row = {"tokens": 8}
    with oom_marks(row):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert row == {"tokens": 8, "oom": True}
    row = {}
    with oom_marks(row):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate ... out of memory")
    assert row == {"oom": True}
    row = {}
    with pytest.raises(RuntimeError, match="shape mismatch"), oom_marks(row):
        raise RuntimeError("shape mismatch")
    assert row == {}
    with oom_marks(row):
        row["median_ms"] = 1.5
    assert row == {"median_ms": 1.5}
