"""--moe-cuda-graph-max-tokens: padding to power-of-two buckets, masking and bookkeeping (CPU, the
padded computation run eagerly: ``capture=False``), refusals; the captured graphs are tested on the
GPU (tests/test_gpu.py)."""

import copy

import pytest
import torch

from fairseq_moe_infer.inference import configure_buffering, configure_cuda_graphs
from fairseq_moe_infer.moe import MoEConfigError, MoELayer
from fairseq_moe_infer.moe.graphs import LayerGraphs, bucket_of

from .helpers import MT_ARGS, run


def _layer(**kw):
    torch.manual_seed(0)
    m = MoELayer(16, 32, 8, k=2, gating="dynamic", **kw).double().eval()
    with torch.no_grad():
        m.gate.wg.weight.mul_(4.0)  # confident routing: several experts per call
    return m


def _reference(layer, x, pad):
    """Dense per-token float64 loop over the gate's top-2 (GShard combine weights p_i / (p_1 + p_2))."""
    out = torch.zeros_like(x)
    probs = torch.softmax(x @ layer.gate.wg.weight.t(), dim=1)
    e = layer.experts
    for t in range(x.shape[0]):
        if pad is not None and pad[t]:
            continue
        top = probs[t].topk(2)
        for p, i in zip(top.values / top.values.sum(), top.indices.tolist()):
            h = torch.relu(e.fc1_weight[i] @ x[t] + e.fc1_bias[i])
            out[t] += p * (e.fc2_weight[i] @ h + e.fc2_bias[i])
    return out


def test_bucket_is_the_next_power_of_two():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 8, 9, 1000, 1024, 1025)] == [1, 2, 4, 8, 8, 16, 1024, 1024, 2048]


@pytest.mark.parametrize("with_padding", [False, True])
def test_padded_calls_equal_the_plain_layer_and_a_float64_reference(with_padding):
    plain = _layer()
    graphed = copy.deepcopy(plain)
    graphed.set_cuda_graphs(16, capture=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (5, 1, 16, 11, 3, 20):  # 20 > 16: eager
            x = torch.randn(n, 16, generator=g, dtype=torch.float64)
            pad = (torch.rand(n, generator=g) < 0.3) if with_padding else None
            y = graphed(x, pad)
            torch.testing.assert_close(y, plain(x, pad), rtol=0, atol=1e-12)
            torch.testing.assert_close(y, _reference(plain, x, pad), rtol=0, atol=1e-10)
            if pad is not None:
                assert (y[pad] == 0).all()
    assert graphed.graphs.buckets == [1, 4, 8, 16] and graphed.graphs.eager_calls == 5
    # the run summary counts the real tokens only, as without graphs
    assert graphed.eval_totals() == plain.eval_totals()
    assert torch.equal(graphed.eval_rank_loads(), plain.eval_rank_loads())
    assert graphed.eval_totals()["routed"] == 2 * graphed.eval_totals()["tokens"]


def test_training_and_gradient_calls_stay_eager():
    layer = _layer()
    layer.set_cuda_graphs(64, capture=False)
    x = torch.randn(4, 16, dtype=torch.float64)
    layer(x)  # gradients on
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.graphs.eager_calls == 0 and layer.graphs.buckets == []


def test_graphs_are_refused_where_a_call_reads_the_host():
    m = _layer()
    m.set_gating("static")
    with pytest.raises(MoEConfigError, match="--moe-gating dynamic"):
        m.set_cuda_graphs(8, capture=False)
    m = _layer()
    m.set_cuda_graphs(8, capture=False)
    with pytest.raises(MoEConfigError, match="--moe-gating dynamic"):
        m.set_gating("static")
    model = torch.nn.Sequential(_layer())
    configure_buffering(model, 4)
    with pytest.raises(MoEConfigError, match="--moe-expert-buffer-size"):
        configure_cuda_graphs(model, 8, capture=False)
    for bad in (-1, 0.5, True):
        with pytest.raises(MoEConfigError, match="integer >= 1"):
            LayerGraphs(bad)


def test_generate_refuses_graphs_with_static_gating_and_on_the_cpu():
    args = list(MT_ARGS)
    proc = run("generate", args + ["--moe-cuda-graph-max-tokens", "64", "--moe-gating", "static"])
    assert proc.returncode != 0 and "--moe-cuda-graph-max-tokens needs --moe-gating dynamic" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("generate", args + ["--moe-cuda-graph-max-tokens", "64"])  # MT_ARGS runs with --cpu
    assert proc.returncode != 0 and "captures CUDA graphs: run on a GPU" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    proc = run("generate", args + ["--moe-cuda-graph-max-tokens", "-3"])
    assert proc.returncode != 0 and "--moe-cuda-graph-max-tokens must be a finite integer" in proc.stderr


@pytest.mark.parametrize("route_padding", [False, True])
def test_padded_calls_keep_the_eager_balancing_loss(route_padding):
    """The gate's l_aux (read by the moe_* criterions in fairseq-validate and training's validation) is
    the eager call's: the bucket's padding rows (stale rows of earlier calls) must not enter its means."""
    plain = _layer(route_padding=route_padding)
    graphed = copy.deepcopy(plain)
    graphed.set_cuda_graphs(16, capture=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in (16, 5, 11, 3):  # the first call fills the 16-row bucket; later ones leave stale rows
            x = torch.randn(n, 16, generator=g, dtype=torch.float64)
            pad = torch.rand(n, generator=g) < 0.3
            y = graphed(x, pad)
            torch.testing.assert_close(y, plain(x, pad), rtol=0, atol=1e-12)
            torch.testing.assert_close(graphed.l_aux, plain.l_aux, rtol=1e-12, atol=0)


def test_capturing_layer_refuses_the_cpu_also_for_calls_above_the_bucket_limit():
    """--cpu with the flag is refused at the first inference call, whatever its size: fairseq-eval-lm's
    calls (thousands of tokens) never reach a bucket, so the flag did nothing there, silently."""
    layer = _layer()
    layer.set_cuda_graphs(8)  # capture=True, as in the tools
    with torch.no_grad(), pytest.raises(MoEConfigError, match="run on a GPU"):
        layer(torch.randn(20, 16, dtype=torch.float64))
    layer(torch.randn(4, 16, dtype=torch.float64))  # gradients on (training's forward): eager, allowed


def test_graphs_are_dropped_when_the_weights_are_replaced():
    """A captured graph reads the weights' addresses: after ``.float()`` / ``.double()`` (new storage, the
    old freed) the graphs of the old weights are dropped, not replayed when the dtype comes back."""
    layer = _layer()
    plain = copy.deepcopy(layer)
    layer.set_cuda_graphs(16, capture=False)
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.float()
        layer(x.float())
        assert len(layer.graphs._graphs) == 1  # the float64 bucket of the replaced weights is gone
        layer.double()
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=1e-6)
        assert len(layer.graphs._graphs) == 1


def test_training_refuses_the_graph_flag(tmp_path):
    from .helpers import TINY_LM, USER_DIR

    proc = run("train", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--arch",
                         "transformer_lm_moe_small", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64",
                         "--max-tokens", "1024", "--max-update", "1", "--optimizer", "adam", "--lr", "1e-3", "--cpu",
                         "--save-dir", tmp_path / "train", "--moe-gating", "dynamic", "--moe-cuda-graph-max-tokens", "64"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--moe-cuda-graph-max-tokens is for inference" in proc.stderr.strip().splitlines()[-1]
