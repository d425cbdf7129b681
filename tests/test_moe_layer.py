"""The MoE layer against a float64 per-token reference, hand-computed losses and capacities."""

import math
import re

import pytest
import torch

from fairseq_moe_infer.moe import MoEConfigError, MoELayer, build_dispatcher
from fairseq_moe_infer.moe.dispatch import StaticDispatcher

from .reference import reference_moe


def make_layer(E=8, d=16, f=32, k=2, gating="static", fraction=0.25, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(d, f, E, k=k, gating=gating, eval_capacity_token_fraction=fraction, **kw).double().eval()
    with torch.no_grad():  # spread the gate so routing is not degenerate
        layer.gate.wg.weight.mul_(4.0)
    return layer


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("fraction", [1.0, 0.1])  # 1.0: nothing dropped; 0.1: heavy dropping
def test_static_matches_float64_reference(k, fraction):
    layer = make_layer(k=k, fraction=fraction)
    x = torch.randn(64, 16, dtype=torch.float64)
    pad = torch.zeros(64, dtype=torch.bool)
    pad[[3, 17, 40]] = True
    y = layer(x, pad)
    cap = math.ceil(fraction * 64)
    ref, dropped, used = reference_moe(layer, x, pad, capacity=cap)
    assert rel_err(y, ref) < 1e-12
    assert y[pad].abs().max().item() == 0.0
    totals = layer.eval_totals()
    assert totals["dropped"] == dropped
    assert totals["expert_counts"] == used
    assert totals["tokens"] == 61 and totals["routed"] == 61 * k
    if fraction == 0.1:
        assert dropped > 0  # the case really drops
    else:
        assert dropped == 0


@pytest.mark.parametrize("k", [1, 2])
def test_dynamic_matches_reference_and_never_drops(k):
    layer = make_layer(k=k, gating="dynamic")
    x = torch.randn(50, 16, dtype=torch.float64)
    y = layer(x)
    ref, dropped, used = reference_moe(layer, x, capacity=None)
    assert rel_err(y, ref) < 1e-12
    assert dropped == 0 and layer.eval_totals()["dropped"] == 0
    assert layer.eval_totals()["expert_counts"] == used


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_static_equals_dynamic_when_nothing_dropped(dtype, tol):
    layer = make_layer(k=2, fraction=1.0).to(dtype)
    x = torch.randn(4, 9, 16).to(dtype)  # [B, T, d], a layout the transformer layers pass
    y_static = layer(x)
    assert layer.last_stats.dropped.item() == 0
    layer.set_gating("dynamic")
    y_dynamic = layer(x)
    assert y_static.shape == x.shape
    assert rel_err(y_dynamic.double(), y_static.double()) < tol


def test_training_capacity_drops_and_gradients_flow():
    layer = make_layer(E=4, k=2).train()
    layer.gate.second_expert_policy = "all"
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    # train capacity = 2 * ceil(40 / 4) = 20 per expert: compare with the reference at that capacity
    ref, dropped, _ = reference_moe(layer, x.detach(), capacity=20)
    assert rel_err(y.detach(), ref) < 1e-12
    assert layer.last_stats.dropped.item() == dropped
    (y.sum() + layer.l_aux).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.gate.wg.weight.grad.abs().sum() > 0
    assert layer.experts.fc1_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_routed_padding_matches_fairseq_branch_default(k):
    """fairseq's MoE branch without --use-moe-pad-mask (its default) routes padding like real tokens: padding takes
    capacity slots (real tokens behind it get dropped) and its first choices count in the balancing loss. The
    float64 reference with no padding mask is exactly that rule; l_aux as in the branch's top2gating
    (me over all tokens, ce = first choices of all tokens / T), computed here in float64 loops."""
    layer = make_layer(k=k, fraction=0.1, route_padding=True)
    masked = make_layer(k=k, fraction=0.1)
    x = torch.randn(64, 16, dtype=torch.float64)
    pad = torch.zeros(64, dtype=torch.bool)
    pad[:12] = True  # leading padding (left-padded batch): it takes the slots first
    y = layer(x, pad)
    ref, dropped, used = reference_moe(layer, x, None, capacity=math.ceil(0.1 * 64))
    assert rel_err(y, ref) < 1e-12
    assert (y[~pad] - masked(x, pad)[~pad]).abs().max().item() > 1e-3  # real tokens see the difference
    totals = layer.eval_totals()
    assert totals["tokens"] == 52 and totals["routed"] == 64 * k and totals["dropped"] == dropped
    assert totals["expert_counts"] == used
    wg = layer.gate.wg.weight.double()
    probs = [torch.softmax(wg @ x[t], 0).tolist() for t in range(64)]
    me = [sum(p[e] for p in probs) / 64 for e in range(8)]
    ce = [sum(1 for p in probs if max(range(8), key=lambda j: p[j]) == e) / 64 for e in range(8)]
    assert layer.l_aux.item() == pytest.approx(sum(a * b for a, b in zip(me, ce)) / 8 * 64, rel=1e-12)


def test_balancing_loss_hand_computed():
    # E=2, 4 tokens, d=2; gate weight = identity so logits = x
    layer = MoELayer(2, 4, 2, k=2).double()
    with torch.no_grad():
        layer.gate.wg.weight.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    pad = torch.tensor([False, False, False, True])
    routing = layer.gate(x, pad)
    s = 1 / (1 + math.exp(-2.0))  # softmax([2, 0])[0]
    s1 = 1 / (1 + math.exp(-1.0))
    me = [(s + (1 - s1) + s1 + 0.5) / 4, ((1 - s) + s1 + (1 - s1) + 0.5) / 4]
    # first choices of non-padding tokens: expert 0, 1, 0 -> ce = [2/4, 1/4] (padding counts in T)
    ce = [2 / 4, 1 / 4]
    expected = (me[0] * ce[0] + me[1] * ce[1]) / 2 * 2 * 2
    assert routing.l_aux.item() == pytest.approx(expected, rel=1e-12)
    assert routing.expert_indices[:, 0].tolist()[:3] == [0, 1, 0]


def test_capacity_arithmetic_hand_cases():
    static = StaticDispatcher(capacity_factor=1.0, eval_capacity_token_fraction=0.25)
    assert static.capacity(10, 4, k=2, training=True) == 6  # fairseq top-2: 2 * ceil(10 / 4)
    assert static.capacity(10, 4, k=1, training=True) == 3  # fairseq top-1: int(1.0 * ceil(10 / 4))
    assert static.capacity(10, 4, k=2, training=False) == 3  # ceil(0.25 * 10)
    assert static.capacity(4096, 128, k=2, training=False) == 1024
    assert StaticDispatcher(1.25, 0.0).capacity(10, 4, k=1, training=False) == 3  # 0 -> training rule
    assert StaticDispatcher(2.0, 0.25).capacity(9, 4, k=1, training=True) == 6  # int(2.0 * 3)


def test_bad_options_raise_clear_errors():
    with pytest.raises(MoEConfigError, match="--moe-top1-expert"):
        MoELayer(8, 8, 1, k=2)
    with pytest.raises(MoEConfigError, match="unknown --moe-gating 'fast'"):
        build_dispatcher("fast")
    with pytest.raises(MoEConfigError, match=r"must be a finite number in \[0.0, 1.0\], got -0.5"):
        build_dispatcher("static", eval_capacity_token_fraction=-0.5)
    with pytest.raises(MoEConfigError, match="second-expert-policy"):
        MoELayer(8, 8, 4, second_expert_policy="best")


def test_fairseq_per_expert_state_dict_is_stacked_on_load():
    layer = make_layer(E=4)
    sd = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}
    for i in range(4):  # fairseq MoE branch layout: one FFN module per expert
        sd[f"experts.{i}.fc1.weight"] = torch.full((32, 16), float(i), dtype=torch.float64)
        sd[f"experts.{i}.fc1.bias"] = torch.zeros(32, dtype=torch.float64)
        sd[f"experts.{i}.fc2.weight"] = torch.zeros(16, 32, dtype=torch.float64)
        sd[f"experts.{i}.fc2.bias"] = torch.full((16,), -float(i), dtype=torch.float64)
    layer.load_state_dict(sd)
    assert layer.experts.fc1_weight[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert layer.experts.fc2_bias[:, 0].tolist() == [0.0, -1.0, -2.0, -3.0]
    other = make_layer(E=8)
    with pytest.raises(MoEConfigError, match="--moe-expert-count 4"):
        other.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("name,value", [
    ("moe_eval_capacity_token_fraction", float("nan")), ("moe_eval_capacity_token_fraction", float("inf")),
    ("moe_eval_capacity_token_fraction", 1e30), ("moe_capacity_factor", float("nan")), ("moe_capacity_factor", float("inf")),
    ("moe_capacity_factor", 1e30), ("moe_capacity_factor", 0.0), ("moe_gate_loss_wt", float("nan")),
    ("moe_expert_count", 2.5), ("moe_freq", -1), ("moe_expert_ffn_dim", float("inf")), ("moe_expert_count", "4"),
])
def test_every_numeric_moe_option_must_be_finite_and_in_range(name, value):
    """One rule table (moe/options.py) serves the gate, the dispatcher, the model, task and criterion options."""
    from fairseq_moe_infer.moe.options import check_moe_options

    flag = "--" + name.replace("_", "-")
    with pytest.raises(MoEConfigError, match=rf"^{flag} must be a finite (number|integer) in .*, got {re.escape(str(value))}"):
        check_moe_options(**{name: value})
    if name in ("moe_eval_capacity_token_fraction", "moe_capacity_factor"):  # the layer's own constructor path
        with pytest.raises(MoEConfigError, match=flag):
            build_dispatcher("static", **{name[4:]: value})
    check_moe_options(moe_eval_capacity_token_fraction=1.0, moe_capacity_factor=64, moe_expert_count=4, moe_freq=0)


@pytest.mark.parametrize("gating", ["static", "dynamic"])
def test_a_batch_without_tokens(gating):
    """All-padding batch (zero tokens reach the gate): zeros out, nothing routed, no error."""
    layer = make_layer(E=4)
    layer.eval()
    layer.set_gating(gating, 1.0)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x, padding_mask=torch.ones(3, dtype=torch.bool))
        empty = layer(x[:0])
    assert torch.equal(out, torch.zeros_like(out)) and empty.shape == (0, 16)
    assert layer.last_stats.dropped.item() == 0


def test_forward_load_log_keeps_every_row_in_a_fixed_device_chunk():
    """ForwardLoadLog (per-forward GPU loads) against a plain list: rows spill to the host every `chunk`
    forwards, zero_from keeps the rows' places, and the device chunk never grows."""
    from fairseq_moe_infer.moe.moe_layer import ForwardLoadLog

    log, ref = ForwardLoadLog(world=2, device=torch.device("cpu"), chunk=3), []
    chunk = log._chunk
    for i in range(8):
        row = torch.tensor([i, 10 * i])
        log.append(row)
        ref.append(row)
    assert len(log) == 8 and log._chunk is chunk and len(log._host) == 2
    assert torch.equal(log.tensor(), torch.stack(ref))
    log.zero_from(4)  # inside the second host chunk and the device chunk
    for i in range(4, 8):
        ref[i] = torch.zeros(2, dtype=torch.long)
    assert torch.equal(log.tensor(), torch.stack(ref))
    assert log.tensor().dtype == torch.long and ForwardLoadLog(2, torch.device("cpu")).tensor().shape == (0, 2)


def test_run_summary_reports_the_gating_the_layers_ran():
    # a report made before the layers were switched (benchmarks build with the task default, then set_gating)
    # said "static" with its fraction for a dynamic run
    from fairseq_moe_infer.report import MoERunReport

    model = torch.nn.ModuleList([MoELayer(8, 16, 4, gating="static").eval() for _ in range(2)])
    report = MoERunReport(model, "static", 0.25, None)
    with torch.no_grad():
        for m in model:
            m.set_gating("dynamic")
            m(torch.randn(5, 8))
    assert (report.summary()["gating"], report.summary()["eval_capacity_token_fraction"]) == ("dynamic", None)
    model[1].set_gating("static", 0.5)
    assert (report.summary()["gating"], report.summary()["eval_capacity_token_fraction"]) == ("mixed (dynamic, static)", 0.5)


def test_a_second_class_under_a_registered_name_is_refused():
    from fairseq_moe_infer.moe.dispatch import DISPATCHERS, register_dispatcher
    from fairseq_moe_infer.moe.eviction import POLICIES, register_policy

    with pytest.raises(ValueError, match="--moe-gating static is already registered"):
        register_dispatcher("static")(type("Other", (), {}))
    with pytest.raises(ValueError, match="--moe-buffer-policy lru is already registered"):
        register_policy("lru")(type("Other", (), {}))
    assert DISPATCHERS["static"].__name__ == "StaticDispatcher" and POLICIES["lru"].__name__ != "Other"
    assert register_dispatcher("static")(DISPATCHERS["static"]) is DISPATCHERS["static"]  # re-registering is a no-op
