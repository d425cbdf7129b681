"""Routing traces (``--moe-record-trace``): the recorder against the gate's own choices, the file
checks, and the stock tools (outputs unchanged, trace consistent with the MoE summary)."""

import json
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from fairseq_moe_infer.moe import MoELayer
from fairseq_moe_infer.trace import RoutingTrace, TraceError, TraceRecorder, merge_rank_traces, read_trace, write_trace

from .helpers import LM_CKPT, MT_ARGS, TINY_LM, USER_DIR, ok, run


class TwoLayers(nn.Module):
    def __init__(self, E=6, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.a = MoELayer(8, 16, E, k=k, gating="dynamic").eval()
        self.b = MoELayer(8, 16, E, k=k, gating="dynamic").eval()


def _reference_choices(layer, x, pad):
    """Top-k experts from the gate's logits in float64 (argmax, then argmax of the rest), padding dropped."""
    logits = x.double() @ layer.gate.wg.weight.double().t()
    order = torch.argsort(logits, dim=1, descending=True)[:, : layer.gate.k]
    return order[~pad].numpy()


@pytest.mark.parametrize("k", [1, 2])
def test_recorder_records_each_call_in_order(k, tmp_path):
    model = TwoLayers(k=k)
    rec = TraceRecorder(model, str(tmp_path / "t.npz"))
    xs = [torch.randn(5, 3, 8), torch.randn(4, 2, 8)]
    pads = [torch.zeros(5, 3, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)]
    pads[0][4, 1:] = True
    expected = []
    with torch.no_grad():
        for x, pad in zip(xs, pads):
            model.a(x, pad)
            model.b(x, pad)
            model.b(x, pad)  # a layer called twice in a row (decoder steps)
            expected += [(0, _reference_choices(model.a, x.reshape(-1, 8), pad.reshape(-1)))]
            expected += [(1, _reference_choices(model.b, x.reshape(-1, 8), pad.reshape(-1)))] * 2
        model.train()
        model.a(xs[0])  # training forwards are not recorded
    path = rec.finish()
    t = read_trace(path, num_experts=6, layer_names=["a", "b"])
    assert t.k == k and t.complete and t.num_calls == len(expected)
    assert t.call_layer.tolist() == [e[0] for e in expected]
    assert t.call_tokens.tolist() == [13, 13, 13, 8, 8, 8]
    for i, (_, ref) in enumerate(expected):
        np.testing.assert_array_equal(t.call_choices(i), ref)
    counts = t.expert_counts("b")
    assert counts.shape == (4, 6) and counts.sum(1).tolist() == [13 * k] * 2 + [8 * k] * 2
    np.testing.assert_array_equal(counts[0], np.bincount(expected[1][1].reshape(-1), minlength=6))
    assert t.calls_of(0) == [0, 3]


def _small_trace(**kw):
    base = dict(num_experts=4, k=2, layer_names=["x.moe_layer"], call_layer=[0, 0], call_tokens=[2, 1],
                choices=np.array([[0, 1], [3, -1], [2, 0]]))
    base.update(kw)
    return RoutingTrace(**base)


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_trace_file_mode_follows_the_umask(umask, tmp_path):
    """A trace gets the mode ``open(path, "w")`` would give it (0o666 less the umask), not a fixed 0o644 that made
    traces world-readable under a private umask."""
    previous = os.umask(umask)
    try:
        write_trace(str(tmp_path / "t.npz"), _small_trace())
    finally:
        os.umask(previous)
    assert (tmp_path / "t.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_traces_are_refused_with_one_line(tmp_path):
    good = tmp_path / "good.npz"
    write_trace(str(good), _small_trace())
    assert read_trace(str(good)).call_choices(1).tolist() == [[2, 0]]
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    cases = {
        str(tmp_path / "none.npz"): "does not exist",
        str(trunc): "corrupt or truncated",
        str(junk): "is not a routing trace (a file starting with b'hell', not an .npz archive)",
        str(empty): "is not a routing trace (an empty file, not an .npz archive)",
        str(single): "is not a routing trace (a single .npy array, not an .npz archive)",
    }
    for path, message in cases.items():
        with pytest.raises(TraceError) as err:
            read_trace(path)
        assert message in _one_line(err)
    with pytest.raises(TraceError) as err:
        read_trace(str(good), num_experts=8)
    assert "recorded with 4 experts per MoE layer but this model has 8" in _one_line(err)
    with pytest.raises(TraceError) as err:
        read_trace(str(good), layer_names=["x.moe_layer", "y.moe_layer"])
    assert "recorded on MoE layers x.moe_layer but this model has x.moe_layer, y.moe_layer" in _one_line(err)
    inconsistent = tmp_path / "inc.npz"
    write_trace(str(inconsistent), _small_trace(call_tokens=[2, 2]))
    with pytest.raises(TraceError) as err:
        read_trace(str(inconsistent))
    assert "token counts sum to 4 but it holds 3" in _one_line(err)
    out_of_range = tmp_path / "oor.npz"
    write_trace(str(out_of_range), _small_trace(choices=np.array([[0, 1], [7, -1], [2, 0]])))
    with pytest.raises(TraceError) as err:
        read_trace(str(out_of_range))
    assert "expert id out of range 0..3" in _one_line(err)
    partial = tmp_path / "partial.npz"
    write_trace(str(partial), _small_trace(complete=False))
    with pytest.raises(TraceError) as err:
        read_trace(str(partial))
    assert "interrupted run" in _one_line(err)
    assert not read_trace(str(partial), allow_incomplete=True).complete
    merged = merge_rank_traces([str(good), str(good)])
    assert merged.num_calls == 4 and merged.choices.shape == (6, 2)


def _summary(text):
    return json.loads(re.search(r"moe_summary (.*)", text).group(1))


def _check_against_summary(trace, summary):
    """The trace's tokens and per-expert counts per layer equal the layers' own evaluation counters."""
    for i, name in enumerate(trace.layer_names):
        layer = summary["layers"][name]
        calls = trace.calls_of(i)
        assert int(trace.call_tokens[calls].sum()) == layer["tokens"]
        assert trace.expert_counts(i).sum(0).tolist() == layer["expert_counts"]


@pytest.mark.slow
def test_generate_records_trace_without_changing_outputs(mt_generate_traced):
    plain = ok(run("generate", MT_ARGS))
    path, traced = mt_generate_traced.trace, mt_generate_traced.text
    hyps = [sorted(line for line in t.splitlines() if line[:2] in ("H-", "D-", "P-")) for t in (plain, traced)]
    assert len(hyps[0]) >= 3 * 45 and hyps[0] == hyps[1]  # H, D, P lines of the ~48 sentences generated
    trace = read_trace(str(path), num_experts=16)
    assert trace.layer_names == ["encoder.layers.1.moe_layer", "encoder.layers.3.moe_layer",
                                 "decoder.layers.1.moe_layer", "decoder.layers.3.moe_layer"]
    _check_against_summary(trace, _summary(traced))


def test_eval_lm_records_trace_without_changing_scores(tmp_path):
    args = [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", LM_CKPT,
            "--gen-subset", "test1", "--tokens-per-sample", "256", "--max-tokens", "4096", "--moe-gating", "static",
            "--moe-eval-capacity-token-fraction", "1.0", "--cpu"]
    ppl = re.compile(r"Loss \(base 2\): [0-9.]+, Perplexity: [0-9.]+")
    plain = ok(run("eval-lm", args))
    path = tmp_path / "lm.npz"
    traced = ok(run("eval-lm", args + ["--moe-record-trace", path]))
    assert ppl.search(plain).group(0) == ppl.search(traced).group(0)
    trace = read_trace(str(path))
    assert all(n.startswith("decoder.layers.") for n in trace.layer_names)
    _check_against_summary(trace, _summary(traced))
    proc = run("eval-lm", args + ["--moe-record-trace", tmp_path / "no" / "such" / "t.npz"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--moe-record-trace: folder" in last and "does not exist" in last
