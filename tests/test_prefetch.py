"""Miss handling of expert buffering (issue #11 item 5): prefetching (``--moe-prefetch``) and CPU
experts (``--moe-cpu-experts``), checked by hand, against float64 references, against the
all-resident store (bit-identical on the CPU "device") and against the trace-driven simulator;
and the routing trace of a run stopped by SIGTERM / SIGINT."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from fairseq_moe_infer.inference import configure_buffering
from fairseq_moe_infer.moe import Experts, MoEConfigError, MoELayer
from fairseq_moe_infer.moe.buffered import ExpertBuffer
from fairseq_moe_infer.moe.cpu_experts import DEFAULT_RATES, CPUExpertCostModel
from fairseq_moe_infer.moe.eviction import SlotCache, build_policy
from fairseq_moe_infer.moe.options import check_moe_options
from fairseq_moe_infer.moe.prefetch import PREDICTORS, next_in_stack, ranked_experts
from fairseq_moe_infer.trace import RoutingTrace, TraceError, read_trace, write_trace

from .helpers import MT_ARGS, REPO, USER_DIR, ok, run, tool, with_default_sigint
from .test_buffering import _PPL, LM_ARGS, _hyps
from .test_trace import _summary

sys.path.insert(0, os.path.join(REPO, "scripts"))
import simulate_buffering  # noqa: E402


# ---- the predictors' parts ------------------------------------------------------------------
def test_ranked_experts_and_stacks():
    assert ranked_experts([0, 5, 2, 5, 0, 1]) == [1, 3, 2, 5]  # most tokens first, ties: lower id
    assert ranked_experts([0, 0]) == []
    names = ["encoder.layers.1.moe_layer", "encoder.layers.3.moe_layer", "decoder.layers.1.moe_layer",
             "decoder.layers.3.moe_layer"]
    assert next_in_stack(names) == {names[0]: names[1], names[1]: None, names[2]: names[3], names[3]: None}
    assert sorted(PREDICTORS) == ["gate", "none", "previous-step"]


def test_slot_cache_prefetch_by_hand():
    cache = SlotCache(5, 2, build_policy("lru", 5))
    cache.lookup([0, 1])  # 2 misses: 0 -> slot 0, 1 -> slot 1
    # the first K=2 distinct predictions are loaded; 1 is resident; 3 evicts the one non-predicted expert (0)
    assert cache.prefetch([3, 1, 3, 4]) == [(3, 0)]
    waves = cache.lookup([3, 2])  # 3: a prefetch hit; 2 evicts 1 (not needed)
    assert waves[0].resident == [(3, 0)] and waves[0].loads == [(2, 1)]
    assert cache.prefetch([4]) == [(4, 0)]  # LRU: 3 (hit before 2 was loaded) goes
    cache.lookup([2])
    assert cache.prefetch([0, 2]) == [(0, 0)]  # evicts the unused prefetched 4
    assert (cache.lookups, cache.hits, cache.misses) == (5, 2, 3)
    assert (cache.prefetches, cache.prefetch_hits, cache.prefetch_evicted_unused) == (3, 1, 1)
    assert cache.prefetch_pending == {0}
    # a predicted expert is never evicted, also not one ranked past K: 0 and 2 stay, 1 is not loaded
    assert cache.prefetch([1, 0, 2]) == [] and sorted(cache.slot_of) == [0, 2]


def test_a_prefetch_is_not_a_use_for_lfu():
    cache = SlotCache(5, 2, build_policy("lfu", 5))
    cache.lookup([0])
    cache.lookup([1])
    assert cache.prefetch([2]) == [(2, 0)]  # 0 and 1 used once each: the least recently used (0) goes
    cache.lookup([3])  # 2 was never used (0 uses) so it goes, not 1 (1 use)
    assert sorted(cache.slot_of) == [1, 3] and cache.prefetch_evicted_unused == 1


def _experts(seed=0, E=5, d=4, f=8):
    torch.manual_seed(seed)
    return Experts(d, f, E).eval()


def _rows(counts, d=4, seed=1):
    """Rows sorted by expert for ``counts`` rows per expert; expert_of_row as the dispatcher makes it."""
    g = torch.Generator().manual_seed(seed + sum(counts))
    n = sum(counts)
    x = torch.randn(n, d, generator=g)
    eor = torch.cat([torch.full((c,), e, dtype=torch.long) for e, c in enumerate(counts)])
    return x, torch.tensor(counts), eor


def test_store_prefetch_statistics_by_hand_and_outputs_unchanged():
    plain = _experts()
    buffered = copy.deepcopy(plain)
    buffered.set_buffer(ExpertBuffer(5, 2, "lru", prefetch="manual"))
    calls = [[1, 1, 0, 0, 0], [0, 0, 2, 1, 0], [0, 0, 3, 0, 0]]  # lookups [0, 1], [2, 3], [2]
    prefetches = [[3, 1, 4], [4], [0, 2]]  # the hand case of test_slot_cache_prefetch_by_hand
    issued = []
    with torch.no_grad():
        for counts, predicted in zip(calls, prefetches):
            x, c, eor = _rows(counts)
            assert torch.equal(buffered.forward_grouped(x, c, eor), plain.forward_grouped(x, c, eor))
            issued.append(buffered.buffer.prefetch(predicted))
    assert issued == [1, 1, 1]
    s = buffered.buffer.stats()
    per_expert = (2 * 4 * 8 + 8 + 4) * 4
    assert (s["lookups"], s["hits"], s["misses"]) == (5, 2, 3)
    assert (s["prefetches"], s["prefetch_hits"], s["prefetch_unused"]) == (3, 1, 2)  # 4 evicted unused, 0 never used
    assert s["bytes_copied_h2d"] == (3 + 3) * per_expert and s["bytes_prefetched"] == 3 * per_expert
    assert s["wasted_prefetch_bytes"] == 2 * per_expert
    # LRU without prefetching: [0, 1] 2 misses, [2, 3] 2 misses, [2] a hit
    assert s["misses_without_prefetch"] == 4 and s["misses_saved"] == 1
    assert s["bytes_copied_without_prefetch"] == 4 * per_expert and s["prefetch"] == "manual"


class _Stack(nn.Module):
    """Two MoE layers named like a fairseq decoder's (``decoder.layers.{1,3}.moe_layer``)."""

    def __init__(self, gating="dynamic", k=2, E=8):
        super().__init__()
        torch.manual_seed(0)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([nn.Module() for _ in range(4)])
        for i in (1, 3):
            m = MoELayer(16, 32, E, k=k, gating=gating, eval_capacity_token_fraction=1.0).eval()
            with torch.no_grad():
                m.gate.wg.weight.mul_(4.0)
            self.decoder.layers[i].moe_layer = m

    def forward(self, x, pad):
        return self.decoder.layers[3].moe_layer(self.decoder.layers[1].moe_layer(x, pad), pad)


def _record_prefetch_calls(model):
    calls = []
    for i in (1, 3):
        buf = model.decoder.layers[i].moe_layer.experts.buffer
        original = buf.prefetch

        def spy(experts, i=i, original=original):
            calls.append((i, list(experts)))
            return original(experts)

        buf.prefetch = spy
    return calls


def _reference_counts(gate, x, pad, E):
    """Top-k of the gate's logits in float64 over the non-padding tokens, tokens per expert."""
    logits = x.reshape(-1, x.shape[-1]).double() @ gate.wg.weight.double().t()
    top = torch.argsort(logits, dim=1, descending=True)[:, : gate.k][~pad.reshape(-1)]
    return torch.bincount(top.reshape(-1), minlength=E).tolist()


@pytest.mark.parametrize("gating", ["dynamic", "static"])
def test_gate_predictor_prefetches_the_next_layers_top_k_and_changes_nothing(gating):
    plain = _Stack(gating)
    model = copy.deepcopy(plain)
    configure_buffering(model, 3, "lifo", prefetch="gate")
    calls = _record_prefetch_calls(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for step in range(4):
            x, pad = torch.randn(3, 5, 16, generator=g), torch.zeros(3, 5, dtype=torch.bool)
            pad[2, 3:] = True
            assert torch.equal(model(x, pad), plain(x, pad))
            # after layer 1's call: layer 3's experts by its gate on layer 1's input; layer 3 (last) predicts nothing
            expected = ranked_experts(_reference_counts(plain.decoder.layers[3].moe_layer.gate, x, pad, 8))
            want = [] if step == 0 else [(3, expected)]  # before layer 3's first call its slots do not exist yet
            assert calls == want, step
            calls.clear()
    s = model.decoder.layers[3].moe_layer.experts.buffer.stats()
    assert s["prefetch"] == "gate" and 0 < s["prefetches"] <= 3 * 3 and s["prefetch_hits"] <= s["prefetches"]
    assert s["misses_saved"] == s["misses_without_prefetch"] - s["misses"]
    assert model.decoder.layers[1].moe_layer.experts.buffer.stats()["prefetches"] == 0


def test_previous_step_predictor_prefetches_the_last_calls_experts():
    plain = _Stack()
    model = copy.deepcopy(plain)
    configure_buffering(model, 2, "fifo", prefetch="previous-step")
    calls = _record_prefetch_calls(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            x, pad = torch.randn(1, 6, 16, generator=g), torch.zeros(1, 6, dtype=torch.bool)
            assert torch.equal(model(x, pad), plain(x, pad))
            layer1 = plain.decoder.layers[1].moe_layer
            h = layer1(x, pad)
            # the K=2 busiest experts of the call just made
            expected = [(1, ranked_experts(_reference_counts(layer1.gate, x, pad, 8))[:2]),
                        (3, ranked_experts(_reference_counts(plain.decoder.layers[3].moe_layer.gate, h, pad, 8))[:2])]
            assert calls == expected
            calls.clear()


# ---- CPU experts: the cost model by hand ------------------------------------------------
def test_cost_model_by_hand():
    # d=4, f=8: FLOPs(n) = 4*4*8*n = 128 n; B = 1000 bytes, s = 2 bytes
    m = CPUExpertCostModel(4, 8, 1000, 2, rates={"h2d_bytes_per_s": 1000, "cpu_flops_per_s": 128,
                                                 "device_flops_per_s": 1280}, measure=False)
    assert m.copy_cost_s(1) == pytest.approx(1.0 + 0.1)  # 1000/1000 + 128/1280
    assert m.cpu_cost_s(1) == pytest.approx(1.0 + 0.016)  # 128/128 + 2*4*2/1000
    assert m.run_on_cpu(1) and not m.run_on_cpu(2)  # 2.032 s on the CPU vs 1.2 s copying
    assert m.max_cpu_tokens() == pytest.approx(1 / 0.916)
    assert not m.run_on_cpu(0)
    m.observe_copy(10**9, 1.0)  # fixed rates (measure=False) stay
    assert m.rate("h2d_bytes_per_s") == 1000
    fast_cpu = CPUExpertCostModel(4, 8, 1000, 2, rates={"h2d_bytes_per_s": 1000, "cpu_flops_per_s": 1280,
                                                        "device_flops_per_s": 128})
    assert fast_cpu.max_cpu_tokens() == math.inf and fast_cpu.run_on_cpu(10**6)  # the CPU is the faster computer
    measured = CPUExpertCostModel(4, 8, 1000, 2, device_type="cuda")
    assert measured.rate("h2d_bytes_per_s") == DEFAULT_RATES["cuda"]["h2d_bytes_per_s"]  # warm-up default
    measured.observe_copy(500, 0.25)
    measured.observe_copy(1500, 0.75)
    assert measured.rate("h2d_bytes_per_s") == 2000.0  # 2000 bytes in 1 s
    assert measured.rates()["h2d_bytes_per_s"] == {"value": 2000.0, "measured": True}
    assert measured.rates()["cpu_flops_per_s"]["measured"] is False
    for bad in ({"h2d_bytes_per_s": 0}, {"cpu_flops_per_s": float("nan")}, {"gpu": 1.0}):
        with pytest.raises(ValueError):
            CPUExpertCostModel(4, 8, 1000, 2, rates=bad)


def test_store_runs_cheap_misses_on_the_cpu_by_hand():
    # B = (2*4*8 + 8 + 4) * 4 = 304 bytes; per row: 128/400 + 2*4*4/304 = 0.4253 s, fixed 304/304 = 1 s:
    # a missed expert with n <= 2 rows runs on the CPU (break-even 2.35 rows), n >= 3 is copied in
    rates = {"h2d_bytes_per_s": 304, "cpu_flops_per_s": 400, "device_flops_per_s": 1e15}
    plain = _experts()
    buffered = copy.deepcopy(plain)
    buffered.set_buffer(ExpertBuffer(5, 2, "lru", cpu_experts="auto", cpu_rates=rates))
    with torch.no_grad():
        for counts in ([1, 3, 0, 2, 0], [3, 1, 0, 0, 4]):
            x, c, eor = _rows(counts)
            assert torch.equal(buffered.forward_grouped(x, c, eor), plain.forward_grouped(x, c, eor))
    assert buffered.buffer.cost.max_cpu_tokens() == pytest.approx(1 / (128 / 400 + 32 / 304))
    s = buffered.buffer.stats()
    # call 1: experts 0 (1 row) and 3 (2 rows) on the CPU, 1 (3 rows) copied; call 2: 1 is resident (a hit
    # with 1 row), 0 (3 rows) and 4 (4 rows) are copied
    assert (s["cpu_runs"], s["cpu_tokens"], s["hits"], s["misses"], s["lookups"]) == (2, 3, 1, 3, 6)
    assert s["copy_bytes_avoided"] == 2 * 304 and s["bytes_copied_h2d"] == 3 * 304
    assert s["cpu_cost_rates"]["h2d_bytes_per_s"] == {"value": 304.0, "measured": False}


@pytest.mark.parametrize("gating", ["dynamic", "static"])
@pytest.mark.parametrize("prefetch", ["none", "gate", "previous-step"])
def test_cpu_experts_and_prefetch_outputs_equal_the_resident_model(gating, prefetch):
    plain = _Stack(gating)
    model = copy.deepcopy(plain)
    configure_buffering(model, 2, "lru", prefetch=prefetch)
    always_cpu = {"h2d_bytes_per_s": 1.0, "cpu_flops_per_s": 1e15, "device_flops_per_s": 1e15}
    for i in (1, 3):  # every miss runs on the CPU (copies are very slow)
        model.decoder.layers[i].moe_layer.experts.buffer.cpu_mode = "auto"
        model.decoder.layers[i].moe_layer.experts.buffer.cpu_rates = always_cpu
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n in (1, 4, 9, 2):
            x, pad = torch.randn(2, n, 16, generator=g), torch.zeros(2, n, dtype=torch.bool)
            pad[1, n - 1] = True
            assert torch.equal(model(x, pad), plain(x, pad))
    for i in (1, 3):
        s = model.decoder.layers[i].moe_layer.experts.buffer.stats()
        assert s["cpu_runs"] > 0 and s["hits"] + s["misses"] + s["cpu_runs"] == s["lookups"]
        assert s["misses"] == 0  # nothing copied on demand; prefetches still fill the slots
        assert s["bytes_copied_h2d"] == s.get("bytes_prefetched", 0)


def test_option_checks():
    check_moe_options(moe_prefetch="gate", moe_cpu_experts="auto", moe_expert_buffer_size=4)
    with pytest.raises(MoEConfigError, match="unknown --moe-prefetch 'next'; choose one of gate, none, previous-step"):
        check_moe_options(moe_prefetch="next")
    with pytest.raises(MoEConfigError, match="unknown --moe-cpu-experts 'on'; choose one of off, auto"):
        check_moe_options(moe_cpu_experts="on")
    with pytest.raises(MoEConfigError, match="--moe-prefetch gate handles the misses of expert buffering: add "
                                             "--moe-expert-buffer-size K"):
        check_moe_options(moe_prefetch="gate", moe_expert_buffer_size=0)
    with pytest.raises(MoEConfigError, match="--moe-cpu-experts auto handles the misses"):
        check_moe_options(moe_cpu_experts="auto", moe_expert_buffer_size=0)
    check_moe_options(moe_prefetch="none", moe_cpu_experts="off", moe_expert_buffer_size=0)


# ---- the simulator's predictors by hand ---------------------------------------------------
def test_simulator_prefetch_by_hand(tmp_path):
    # one decoder layer, 5 experts, top-1; calls use {0,1,2} (2 has 2 tokens), {0,3}, {2}; K=2 LRU
    calls = [[0, 1, 2, 2], [0, 3], [2]]
    trace = RoutingTrace(5, 1, ["decoder.layers.1.moe_layer"], [0, 0, 0], [len(c) for c in calls],
                         [[e] for c in calls for e in c])
    path = tmp_path / "mt_toy.npz"
    write_trace(str(path), trace)
    res = simulate_buffering.run_prefetch([str(path)], ["lru"], [2], ["none", "previous-step", "next-call"])
    t = res["groups"]["MT decoder"]
    none, prev, oracle = (t[p]["lru"][2] for p in ("none", "previous-step", "next-call"))
    # none: 3 + 2 + 1 misses. previous-step: after call 1 (resident {1, 2}) it prefetches the K=2 busiest, [2, 0]:
    # 0 evicts 1; call 2 hits 0; call 3 misses 2. next-call: [0, 3] before call 2, [2] before call 3: only call 1 misses
    assert (none["misses"], none["copies"]) == (6, 6)
    assert (prev["misses"], prev["prefetches"], prev["prefetch_hits"], prev["prefetch_unused"]) == (5, 1, 1, 0)
    assert (prev["misses_saved"], prev["copies_saved"]) == (1, 0)
    assert (oracle["misses"], oracle["prefetches"], oracle["prefetch_hits"], oracle["copies"]) == (3, 3, 3, 6)
    assert oracle["miss_rate"] == 0.5 and oracle["lookups"] == 6


# ---- SIGTERM / SIGINT: the recorder writes what it recorded -----------------------------
_CHILD = textwrap.dedent("""
    import sys, ctypes
    import torch
    from torch import nn
    from fairseq_moe_infer.cli import stop_on_sigterm
    from fairseq_moe_infer.moe import MoELayer
    from fairseq_moe_infer.trace import TraceRecorder

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MoELayer(8, 16, 4, gating="dynamic").eval()
            self.b = MoELayer(8, 16, 4, gating="dynamic").eval()

    stop_on_sigterm(grace_s=float(sys.argv[3]))
    model = Two()
    TraceRecorder(model, sys.argv[1]).register_atexit()
    with torch.no_grad():
        for _ in range(20):
            x = torch.randn(5, 8)
            model.a(x)
            model.b(x)
        print("ready", flush=True)
        if sys.argv[2] == "blocked":  # blocked in a native call that signals do not interrupt (GIL released):
            mutex = ctypes.create_string_buffer(64)  # a zeroed glibc pthread_mutex_t is a default mutex
            libc = ctypes.CDLL(None)
            libc.pthread_mutex_lock(mutex)
            libc.pthread_mutex_lock(mutex)  # relocked by its owner: waits forever (futex; EINTR is retried)
        while True:
            x = torch.randn(5, 8)
            model.a(x)
            model.b(x)
""")


def _child(path, mode="loop", grace=30.0):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode, str(grace)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=with_default_sigint)
    assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-2000:]
    time.sleep(0.5)
    return proc


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_writes_a_partial_trace(sig, status, tmp_path):
    path = tmp_path / "t.npz"
    proc = _child(path)
    proc.send_signal(sig)
    proc.send_signal(sig)  # timeout signals the process, then its process group: the second one is ignored
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    name = signal.Signals(sig).name
    with pytest.raises(TraceError, match=f"interrupted run \\(stopped by {name} after [0-9]+ MoE-layer calls\\)"):
        read_trace(str(path))
    t = read_trace(str(path), num_experts=4, layer_names=["a", "b"], allow_incomplete=True)
    assert not t.complete and t.stopped_by == name and t.num_calls >= 40
    assert t.call_tokens.tolist() == [5] * t.num_calls  # whole calls only
    assert t.call_layer.tolist() == [i % 2 for i in range(t.num_calls)]
    with np.load(path) as z:
        assert int(z["num_calls"]) == t.num_calls and not bool(z["complete"])
    assert f"routing trace of an interrupted run ({name}): the {t.num_calls} MoE-layer calls recorded" in err
    truncated = tmp_path / "truncated.npz"  # still refused when cut short, even with allow_incomplete
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TraceError, match="corrupt or truncated"):
        read_trace(str(truncated), allow_incomplete=True)


def test_header_call_count_is_checked(tmp_path):
    path = tmp_path / "t.npz"
    write_trace(str(path), RoutingTrace(4, 1, ["a"], [0, 0], [1, 1], [[0], [1]]))
    with np.load(path) as z:
        arrays = dict(z)
    arrays["num_calls"] = np.array(3)
    np.savez_compressed(path, **arrays)
    with pytest.raises(TraceError, match="its header counts 3 calls but it holds 2"):
        read_trace(str(path))


def test_sigterm_ends_a_process_blocked_outside_python_after_the_grace_period(tmp_path):
    proc = _child(tmp_path / "t.npz", mode="blocked", grace=1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.time() - t0 < 30
    assert "SIGTERM: the process did not end within 1 s (blocked outside Python)" in err
    assert not (tmp_path / "t.npz").exists()


# ---- the stock tools: outputs equal the all-resident model ------------------------------
@pytest.mark.slow
def test_generate_with_prefetch_and_cpu_experts_equals_resident(mt_generate_traced):
    plain, trace = mt_generate_traced
    t = read_trace(str(trace))
    prev = _summary(ok(run("generate", MT_ARGS + ["--moe-expert-buffer-size", "3", "--moe-prefetch", "previous-step"])))
    gate = _summary(text := ok(run("generate", MT_ARGS + ["--moe-expert-buffer-size", "3", "--moe-prefetch", "gate",
                                                          "--moe-cpu-experts", "auto"])))
    assert _hyps(text) == _hyps(plain)
    # previous-step through the store equals its replay from the trace by the simulator (LIFO, K=3, all layers)
    sim = {}
    for name, (lookups, _) in simulate_buffering.layer_lookups(t).items():
        r = simulate_buffering.simulate_prefetch(lookups, t.expert_counts(name), 3, "lifo", 16, "previous-step")
        for key, v in r.items():
            sim[key] = sim.get(key, 0) + v
    b = prev["buffer"]
    assert (b["lookups"], b["misses"], b["prefetches"], b["prefetch_hits"], b["prefetch_unused"]) == \
        (sim["lookups"], sim["misses"], sim["prefetches"], sim["prefetch_hits"], sim["prefetch_unused"])
    per_expert = b["device_bytes_buffered"] // (3 * 4)
    assert b["bytes_copied_h2d"] == (b["misses"] + b["prefetches"]) * per_expert
    g = gate["buffer"]
    assert g["prefetch"] == "gate" and g["cpu_experts"] == "auto" and g["lookups"] == sim["lookups"]
    assert g["hits"] + g["misses"] + g["cpu_runs"] == g["lookups"] and g["cpu_runs"] > 0
    assert g["prefetches"] > 0
    enc1, dec1 = gate["layers"]["encoder.layers.1.moe_layer"], gate["layers"]["decoder.layers.1.moe_layer"]
    assert enc1["buffer"]["prefetches"] == dec1["buffer"]["prefetches"] == 0  # first MoE layer of a stack: no prediction


@pytest.mark.slow
def test_eval_lm_with_gate_prefetch_and_cpu_experts_equals_resident():
    args = LM_ARGS + ["--moe-gating", "static", "--moe-eval-capacity-token-fraction", "1.0"]
    args[args.index("--max-tokens") + 1] = "256"  # one 256-token block a batch: the 800 tokens in 4 batches
    plain = ok(run("eval-lm", args))
    text = ok(run("eval-lm", args + ["--moe-expert-buffer-size", "4", "--moe-prefetch", "gate", "--moe-cpu-experts", "auto"]))
    assert _PPL.search(plain).group(0) == _PPL.search(text).group(0)
    b = _summary(text)["buffer"]
    assert b["prefetches"] > 0 and b["hits"] + b["misses"] + b["cpu_runs"] == b["lookups"]
    proc = run("eval-lm", LM_ARGS + ["--moe-prefetch", "gate"])
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert proc.returncode != 0 and last == ("fairseq-eval-lm: error: --moe-prefetch gate handles the misses of expert "
                                             "buffering: add --moe-expert-buffer-size K (K >= 1 device slots per MoE "
                                             "layer), or drop it")


@pytest.mark.slow
def test_generate_stopped_by_timeout_writes_a_partial_trace_and_summary(tmp_path):
    trace, stats = tmp_path / "mt.npz", tmp_path / "stats.json"
    args = [os.path.join(REPO, "assets", "mt"), "--user-dir", USER_DIR] + MT_ARGS[3:] + \
        ["--moe-record-trace", trace, "--moe-stats-json", stats]
    args[args.index("--max-tokens") + 1] = "256"  # many small batches: the whole set takes minutes on a CPU
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(tool("generate") + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    seen = ""
    while seen.count("\nH-") < 5:  # a few batches translated
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()[-2000:]
        seen += "\n" + line
    os.killpg(proc.pid, signal.SIGTERM)  # as timeout does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    t = read_trace(str(trace), num_experts=16, allow_incomplete=True)
    assert not t.complete and t.stopped_by == "SIGTERM" and t.num_calls > 0
    summary = json.loads(stats.read_text())
    assert summary["complete"] is False
    assert int(t.call_tokens[t.calls_of("encoder.layers.1.moe_layer")].sum()) == \
        summary["layers"]["encoder.layers.1.moe_layer"]["tokens"]
