"""GPU checks (run on the device machine): grouped GEMM and static == dynamic in bf16/fp16."""

import pytest
import torch

from fairseq_moe_infer.moe import MoELayer
from fairseq_moe_infer.moe.experts import grouped_gemm_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _layer(dtype, E=16, d=256, f=512, k=2):
    torch.manual_seed(0)
    layer = MoELayer(d, f, E, k=k, eval_capacity_token_fraction=1.0).cuda().to(dtype).eval()
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2])
def test_static_equals_dynamic_on_gpu(dtype, k):
    layer = _layer(dtype, k=k)
    x = torch.randn(1024, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        y_static = layer(x)
        assert layer.last_stats.dropped.item() == 0
        layer.set_gating("dynamic")
        y_dynamic = layer(x)
    # same routing (same dtype), so the only differences are rounding in the expert GEMMs
    err = ((y_dynamic.double() - y_static.double()).norm() / y_static.double().norm()).item()
    assert err < 1e-2, err


def test_grouped_mm_matches_loop():
    layer = _layer(torch.bfloat16)
    if not grouped_gemm_available(layer.experts.fc1_weight):
        pytest.skip("torch._grouped_mm not available on this GPU")
    counts = torch.tensor([0, 5, 17, 0, 64, 1, 2, 3, 100, 0, 7, 9, 11, 13, 200, 24], device="cuda")
    n = int(counts.sum())
    x = torch.randn(n + 10, 256, device="cuda", dtype=torch.bfloat16)
    expert_of_row = torch.cat([torch.repeat_interleave(torch.arange(16, device="cuda"), counts),
                               torch.full((10,), 16, device="cuda")])
    with torch.no_grad():
        y = layer.experts.forward_grouped(x, counts, expert_of_row)
        ref = torch.zeros(n + 10, 256, dtype=torch.float64, device="cuda")
        start = 0
        for e, c in enumerate(counts.tolist()):
            w1, b1 = layer.experts.fc1_weight[e].double(), layer.experts.fc1_bias[e].double()
            w2, b2 = layer.experts.fc2_weight[e].double(), layer.experts.fc2_bias[e].double()
            ref[start:start + c] = torch.relu(x[start:start + c].double() @ w1.T + b1) @ w2.T + b2
            start += c
    assert y[n:].abs().max().item() == 0.0
    err = ((y[:n].double() - ref[:n]).norm() / ref[:n].norm()).item()
    assert err < 1e-2, err
