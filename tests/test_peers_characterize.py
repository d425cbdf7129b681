"""The peer benchmark's and the characterisation's pure logic, against hand computations and
independent references (bench_peers.py, characterize.py; the GPU runs are in benchmarks/results/)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_peers import (
    TorchLoop,
    deepspeed_capacity,
    dropped_choices,
    reference_layer,
    tutel_capacity,
)
from benchmarks.characterize import (
    PhaseTimer,
    active_params,
    dense_ffn_width,
    fig7,
    inactive_per_batch,
    param_category,
    uniform_inactive,
)
from fairseq_moe_infer.moe import MoELayer
from fairseq_moe_infer.trace import RoutingTrace, write_trace


def test_capacity_rules_by_hand():
    # Tutel: k * int(cf * ceil(T / E)); cf = 0 is its dropless mode
    assert tutel_capacity(10, 4, 2, 1.0) == 6 and tutel_capacity(10, 4, 2, 0.5) == 2 and tutel_capacity(10, 4, 2, 0.0) == -1
    # DeepSpeed top-2: max(ceil(T / E * 2 cf), min_capacity); drop_tokens=False is dropless
    assert deepspeed_capacity(10, 4, 1.0) == 5 and deepspeed_capacity(3, 4, 1.0) == 4
    assert deepspeed_capacity(10, 4, 1.0, drop_tokens=False) == -1
    assert dropped_choices([5, 1, 3], 2) == 4 and dropped_choices([5, 1, 3], -1) == 0


def test_dropped_choices_equals_a_gshard_slot_simulation():
    # first choices take slots in token order, then second choices (fairseq, Tutel, DeepSpeed); count the misses
    rng = np.random.default_rng(0)
    for capacity in (0, 1, 3, 7, 40):
        choices = rng.integers(0, 6, size=(50, 2))
        choices[:, 1] = (choices[:, 0] + 1 + rng.integers(0, 5, size=50)) % 6  # a second expert != the first
        used, dropped = np.zeros(6, int), 0
        for col in (0, 1):
            for e in choices[:, col]:
                if used[e] < capacity:
                    used[e] += 1
                else:
                    dropped += 1
        assert dropped_choices(np.bincount(choices.ravel(), minlength=6), capacity) == dropped


def test_torch_loop_and_our_layer_equal_a_float64_per_token_reference():
    torch.manual_seed(0)
    ref = reference_layer(6, 8, 12, torch.device("cpu"), torch.float64, seed=3)
    ref.gate.use_fp32 = False  # float64 throughout (the benchmark's fp32 gate would round to 1e-7 here)
    ex = ref.experts
    with torch.no_grad():
        assert float(ex.fc1_bias.abs().sum() + ex.fc2_bias.abs().sum()) == 0.0  # zero: MegaBlocks' experts have none
        ex.fc1_bias.normal_()  # the loop must still apply biases correctly
        ex.fc2_bias.normal_()
        x = torch.randn(20, 8, dtype=torch.float64)
        want = torch.zeros_like(x)
        for t in range(20):  # softmax gate, top-2 renormalised, each expert fc2(relu(fc1 x))
            p = F.softmax(x[t] @ ref.gate.wg.weight.T, dim=-1)
            w, idx = p.topk(2)
            w = w / w.sum()
            for j, e in enumerate(idx.tolist()):
                h = torch.relu(ex.fc1_weight[e] @ x[t] + ex.fc1_bias[e])
                want[t] += w[j] * (ex.fc2_weight[e] @ h + ex.fc2_bias[e])
        torch.testing.assert_close(TorchLoop("torch-loop", ref)(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref(x), want, rtol=1e-12, atol=1e-12)


def _trace(path=None):
    # 4 experts, top-2; calls: L1 (4 tokens), L3 (2 tokens), L1 (3 tokens)
    choices = np.array([[0, 1], [1, 0], [2, -1], [2, 3],   # call 0, layer 1: all 4 experts used
                        [3, 2], [2, 3],                    # call 1, layer 3: experts 2, 3
                        [1, 0], [1, 0], [3, 1]], np.int16)  # call 2, layer 1: experts 0, 1, 3
    t = RoutingTrace(4, 2, ["decoder.layers.1.moe_layer", "decoder.layers.3.moe_layer"], [0, 1, 0], [4, 2, 3], choices)
    if path:
        write_trace(path, t)
    return t


def test_inactive_experts_by_hand():
    t = _trace()
    assert inactive_per_batch(t, 0).tolist() == [0, 1]
    assert inactive_per_batch(t, "decoder.layers.3.moe_layer").tolist() == [2]
    # batches of 2 tokens: call 0 -> {0,1}, {2,3}; call 2 -> {0,1} (its third token left out)
    assert inactive_per_batch(t, 0, batch_tokens=2).tolist() == [2, 2, 2]
    # batches of 4: only call 0 is long enough
    assert inactive_per_batch(t, 0, batch_tokens=4).tolist() == [0]
    assert uniform_inactive(4, 2, 1) == 2.0 and uniform_inactive(16, 2, 16) == pytest.approx(16 * (14 / 16) ** 16)


def test_fig7_rows_from_trace_files(tmp_path):
    _trace(str(tmp_path / "lm_a.npz"))
    res = fig7(str(tmp_path), [2])
    rows = {(r["layer"], r["batch_tokens"]): r for r in res["rows"]}
    assert res["traces"] == {"LM": ["lm_a.npz"]}  # no mt_*.npz: no MT groups
    r = rows[("decoder.layers.1.moe_layer", "recorded")]
    assert (r["batches"], r["mean_inactive"], r["max"], r["median_tokens_per_batch"]) == (2, 0.5, 1, 3.5)
    r = rows[("decoder.layers.1.moe_layer", 2)]
    assert (r["batches"], r["mean_inactive"], r["uniform_expectation"]) == (3, 2.0, 1.0)


def test_param_categories():
    assert param_category("decoder.embed_tokens.weight") == "embeddings"
    assert param_category("decoder.output_projection.weight") == "embeddings"
    assert param_category("encoder.layers.0.self_attn.k_proj.weight") == "attention"
    assert param_category("decoder.layers.2.encoder_attn_layer_norm.bias") == "attention"
    assert param_category("decoder.layers.1.moe_layer.experts.fc1_weight") == "experts"
    assert param_category("decoder.layers.1.moe_layer.gate.wg.weight") == "other"
    assert param_category("decoder.layers.0.fc1.weight") == "other"
    assert param_category("decoder.layer_norm.weight") == "other"


def test_dense_model_of_equal_active_parameters():
    # LM: MoE (top-2 of width 4096) on every 2nd layer -> (4096 + 2 * 4096) / 2; MT: every 4th -> (3 * 8192 + 2 * 8192) / 4
    assert dense_ffn_width("lm") == 6144 and dense_ffn_width("mt") == 10240
    layer = MoELayer(8, 16, 4, k=2)
    experts = 4 * (16 * 8 + 16 + 8 * 16 + 8)
    assert sum(p.numel() for p in layer.parameters()) == 8 * 4 + experts
    assert active_params(torch.nn.Sequential(layer)) == 8 * 4 + experts // 2


@pytest.mark.parametrize("gating", ["static", "dynamic"])
def test_phase_timer_marks_each_phase_once_per_forward_and_restores_the_layer(gating):
    layer = MoELayer(8, 16, 4, k=2, gating=gating).eval()
    x = torch.randn(10, 8)
    with torch.no_grad(), PhaseTimer(torch.nn.Sequential(layer), torch.device("cpu")) as timer:
        for _ in range(2):
            timer.reset()
            t0 = timer.now()
            layer(x)
            total = 1000 * (timer.now() - t0)
            assert {k: len(v) for k, v in timer.marks.items()} == {"moe": 1, "gate": 1, "experts": 1}
            phases = timer.phases_ms(total)
            assert all(v >= 0 for v in phases.values())
            assert sum(phases.values()) == pytest.approx(total)
    assert "forward_grouped" not in vars(layer.experts) and "forward_padded" not in vars(layer.experts)
    assert not layer._forward_hooks and not layer._forward_pre_hooks and not layer.gate._forward_hooks
