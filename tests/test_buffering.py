"""Expert buffering: eviction policies by hand and against a brute-force optimum, the buffered store
against the all-resident one (bit-identical outputs, CPU "device"), under expert parallelism, and
its statistics and option checks."""

import copy
import itertools
import os
import random
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_moe_infer.inference import configure_buffering
from fairseq_moe_infer.moe import MoEConfigError, MoELayer
from fairseq_moe_infer.moe.buffered import ExpertBuffer
from fairseq_moe_infer.moe.eviction import POLICIES, SlotCache, build_policy
from fairseq_moe_infer.moe.placement import LayerPlacement
from fairseq_moe_infer.trace import RoutingTrace, TraceRecorder, read_trace, write_trace

from .helpers import LM_CKPT, MT_ARGS, TINY_LM, USER_DIR, free_port, ok, run
from .test_expert_parallel import E, _full_layer, _inputs
from .test_trace import _summary

_PPL = re.compile(r"Loss \(base 2\): [0-9.]+, Perplexity: [0-9.]+")


def _misses(policy, seq, K, E=5):
    cache = SlotCache(E, K, build_policy(policy, E, seq if policy == "belady" else None))
    for active in seq:
        cache.lookup(active)
    assert cache.hits + cache.misses == cache.lookups == sum(len(a) for a in seq)
    return cache.misses


@pytest.mark.parametrize("seq,hits", [
    # t3 needs a slot for 2: fifo evicts 0 (loaded first), the others keep it (used at t2 / used twice / next use t4)
    ([[0], [1], [0], [2], [0]], {"lru": 2, "fifo": 1, "lifo": 2, "lfu": 2, "belady": 2}),
    # t3: lifo evicts 1 (the last loaded), the others evict 0
    ([[0], [1], [1], [2], [1]], {"lru": 2, "fifo": 2, "lifo": 1, "lfu": 2, "belady": 2}),
])
def test_policies_by_hand(seq, hits):
    assert set(hits) == set(POLICIES)
    for policy, h in hits.items():
        assert sum(map(len, seq)) - _misses(policy, seq, K=2) == h, policy


def _optimal_misses(seq, K):
    """Fewest misses over every possible eviction choice (exhaustive search)."""
    best = {frozenset(): 0}
    for active in seq:
        nxt = {}
        for resident, cost in best.items():
            missing = [e for e in active if e not in resident]
            evictable = sorted(resident - set(active))
            room = K - len(resident)
            n_evict = max(0, len(missing) - room)
            for out in itertools.combinations(evictable, n_evict):
                state = frozenset((resident - set(out)) | set(missing))
                nxt[state] = min(nxt.get(state, 1 << 30), cost + len(missing))
        best = nxt
    return min(best.values())


def test_belady_is_optimal_and_online_policies_are_not_better():
    rng = random.Random(0)
    for trial in range(60):
        K = rng.choice([2, 3])
        seq = [rng.sample(range(5), rng.randint(1, K)) for _ in range(rng.randint(4, 10))]
        opt = _optimal_misses(seq, K)
        assert _misses("belady", seq, K) == opt, (seq, K)
        for policy in ("lifo", "lru", "fifo", "lfu"):
            assert _misses(policy, seq, K) >= opt


def test_a_call_needing_more_than_k_experts_runs_in_waves():
    cache = SlotCache(8, 3, build_policy("lru", 8))
    cache.lookup([0, 1])
    waves = cache.lookup([5, 1, 2, 3, 4, 0, 6])
    seen = [e for w in waves for e, _ in w.resident + w.loads]
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 6] and len(seen) == 7
    assert all(len(w.resident) + len(w.loads) <= 3 for w in waves)
    assert waves[0].resident == [(1, 1), (0, 0)]  # hits compute in the first wave
    assert cache.hits == 2 and cache.misses == 7  # 2 + 5


def _layer(gating, k, E=8, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(16, 32, E, k=k, gating=gating, eval_capacity_token_fraction=1.0).eval()
    with torch.no_grad():
        layer.gate.wg.weight.mul_(4.0)
    return layer


@pytest.mark.parametrize("gating", ["dynamic", "static"])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_buffered_store_equals_resident_store(gating, K):
    for k, policy in itertools.product([1, 2], sorted(POLICIES)):
        _check_buffered_equals_resident(gating, k, K, policy)


def _check_buffered_equals_resident(gating, k, K, policy):
    plain = _layer(gating, k)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 16, generator=g) for n in (1, 7, 30, 3, 50)]
    with torch.no_grad():
        routings = [plain.gate(x) for x in xs]
    used = [sorted(set(r.expert_indices[r.valid].tolist())) for r in routings]  # the reference lookups
    buffered = copy.deepcopy(plain)
    configure_buffering(buffered, K, policy) if policy != "belady" else \
        buffered.experts.set_buffer(ExpertBuffer(8, K, policy, future=used))
    with torch.no_grad():
        for x in xs:
            assert torch.equal(buffered(x), plain(x))
    s = buffered.experts.buffer.stats()
    assert s["lookups"] == sum(map(len, used)) and s["hits"] + s["misses"] == s["lookups"]
    per_expert = (16 * 32 * 2 + 32 + 16) * 4
    assert s["bytes_copied_h2d"] == s["misses"] * per_expert
    assert s["device_bytes_buffered"] == K * per_expert and s["device_bytes_all_resident"] == 8 * per_expert
    assert s["misses"] >= min(8, sum(map(len, used)))  # cold start: the first use of each expert misses
    if K == 8:
        assert s["misses"] == len(set().union(*map(set, used)))  # everything fits: compulsory misses only
    assert buffered.experts.fc1_weight.numel() == 0  # the device copy of all experts is released


def test_belady_counts_and_warns_about_a_trace_of_another_run(caplog):
    # belady replays the trace's future; a trace of other data or flags was taken silently (the run then reported
    # a 'belady' hit rate that is not the optimum's): the store compares each call's experts with the trace's call
    plain = _layer("dynamic", 2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 16, generator=g) for n in (5, 9, 2, 7)]
    with torch.no_grad():
        used = [sorted(set(r.expert_indices[r.valid].tolist())) for r in (plain.gate(x) for x in xs)]
    other = [[e for e in range(8) if e not in u] or [0] for u in used]  # every call disjoint from this run's
    seen = []
    for future, mismatched in ((used, 0), (used[:2], 2), (used + other, 0), ([used[0]] + other[1:], 3)):
        layer = copy.deepcopy(plain)
        layer.experts.set_buffer(ExpertBuffer(8, 2, "belady", future=future))
        caplog.clear()
        with torch.no_grad(), caplog.at_level("WARNING", logger="fairseq_moe_infer"):
            for x in xs:
                assert torch.equal(layer(x), plain(x))
        assert layer.experts.buffer.stats()["trace_mismatched_calls"] == mismatched, future
        warnings = [r.getMessage() for r in caplog.records if "--moe-buffer-trace does not match" in r.getMessage()]
        assert len(warnings) == (1 if mismatched else 0), warnings
        seen += warnings
    assert "the trace's 2 calls of that layer do not reach" in seen[0]
    assert "call 1 of a MoE layer used experts" in seen[1] and "record the trace with the same data" in seen[1]
    assert "trace_mismatched_calls" not in ExpertBuffer(8, 2, "lru").stats()  # only belady replays a trace


def test_belady_replays_the_trace_through_the_placement(tmp_path):
    # with --moe-placement, belady's future was the trace's logical experts [global_offset, + slots), but the store's
    # slots hold the map's experts (and replicas): it evicted by another future. Now the recorded choices are routed
    # through the map as the layer routes them, and the future is the physical slots each call uses
    slots = [3, 7, 0, 1, 2, 3, 4, 5, 6, 7]  # one rank, 10 slots for 8 experts: replicas of 3 and 7
    model = torch.nn.Sequential(_layer("dynamic", 2))
    model[0].set_placement(LayerPlacement(slots, 8, 1))
    model.eval()
    buffered = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 16, generator=g) for n in (6, 3, 9, 2, 5, 4, 7)]
    recorder = TraceRecorder(model, str(tmp_path / "t.npz"))
    used = []
    with torch.no_grad():
        plain = [model(x) for x in xs]
        for x in xs:
            r = model[0].placement.route(model[0].gate(x))
            used.append(sorted(set(r.expert_indices[r.valid].tolist())))  # physical slots with tokens, per call
    write_trace(str(tmp_path / "t.npz"), recorder.trace())
    configure_buffering(buffered, 3, "belady", str(tmp_path / "t.npz"))
    with torch.no_grad():
        for x, y in zip(xs, plain):
            assert torch.equal(buffered(x), y)
    s = buffered[0].experts.buffer.stats()
    assert s["trace_mismatched_calls"] == 0 and s["lookups"] == sum(map(len, used))
    assert s["misses"] == _misses("belady", used, K=3, E=10)


def test_buffer_option_errors():
    with pytest.raises(MoEConfigError, match="between 1 and the 8 experts per rank"):
        configure_buffering(_layer("dynamic", 2), 9, "lru")
    with pytest.raises(MoEConfigError, match="unknown --moe-buffer-policy 'mru'"):
        configure_buffering(_layer("dynamic", 2), 2, "mru")
    with pytest.raises(MoEConfigError, match="belady replays a routing trace: give --moe-buffer-trace"):
        configure_buffering(_layer("dynamic", 2), 2, "belady")
    layer = _layer("dynamic", 2)
    configure_buffering(layer, 2, "lru")
    layer(torch.randn(4, 16))
    layer.train()
    with pytest.raises(MoEConfigError, match="for inference"):
        layer(torch.randn(4, 16))


_EP_CASES = [("dynamic", 0.25), ("static", 1.0)]


def _ep_worker(rank, world, port, full_state, results, trace_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for gating, fraction in _EP_CASES:
            torch.manual_seed(1)
            plain = MoELayer(16, 24, E, k=2, gating=gating, eval_capacity_token_fraction=fraction).double().eval()
            plain.load_state_dict(full_state)
            buffered = copy.deepcopy(plain)
            recorder = TraceRecorder(plain, trace_path) if gating == "dynamic" else None
            configure_buffering(buffered, 1, "lru")  # 1 slot for this rank's 4 experts: waves every call
            same = []
            with torch.no_grad():
                for step in range(3):
                    x, pad = _inputs(rank + 10 * step, fraction)
                    same.append(torch.equal(plain(x, pad), buffered(x, pad)))
            results[(rank, gating)] = (same, buffered.experts.buffer.stats())
            if recorder is not None:
                recorder.finish()  # each rank its own file
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_each_rank_buffers_its_experts(tmp_path):
    results = mp.Manager().dict()
    full_state = _full_layer("dynamic", 0.25).state_dict()  # the weights do not depend on the gating
    path = str(tmp_path / "ep.npz")
    mp.spawn(_ep_worker, args=(2, free_port(), full_state, results, path), nprocs=2, join=True)
    for rank, file in enumerate([path, path + ".rank1"]):  # rank r > 0 writes PATH.rank<r>
        t = read_trace(file, num_experts=E)
        assert (t.rank, t.world_size, t.num_calls) == (rank, 2, 3)
        n, pad = _inputs(rank, 0.25)[0].shape[0], _inputs(rank, 0.25)[1]
        assert t.call_tokens[0] == n - int(pad.sum())  # this rank's own non-padding tokens
    for rank, (gating, _) in itertools.product(range(2), _EP_CASES):
        same, stats = results[(rank, gating)]
        assert same == [True] * 3, gating
        assert stats["device_bytes_all_resident"] == 4 * stats["device_bytes_buffered"]
        assert stats["waves"] > stats["calls"]  # more than one expert per call through one slot


LM_ARGS = [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", LM_CKPT, "--gen-subset", "test1",
           "--tokens-per-sample", "256", "--max-tokens", "2048", "--cpu"]


def _hyps(text):
    return sorted(line for line in text.splitlines() if line[:2] in ("H-", "D-", "P-"))


@pytest.mark.slow
def test_generate_buffered_equals_resident(mt_generate_traced):
    plain, trace = mt_generate_traced
    assert len(_hyps(plain)) >= 3 * 45
    lookups = sum(read_trace(str(trace)).active(i).sum() for i in range(4))  # experts with tokens, per call
    for flags in (["--moe-buffer-policy", "lifo", "--moe-expert-buffer-size", "3"],
                  ["--moe-buffer-policy", "belady", "--moe-expert-buffer-size", "5", "--moe-buffer-trace", trace]):
        text = ok(run("generate", MT_ARGS + flags))
        assert _hyps(text) == _hyps(plain), flags
        total = _summary(text)["buffer"]
        assert total["lookups"] == lookups and total["hits"] + total["misses"] == lookups
        assert total.get("trace_mismatched_calls", 0) == 0  # the run's own trace matches call for call
        K = int(flags[3])
        assert total["device_bytes_all_resident"] * K == 16 * total["device_bytes_buffered"]
    # belady is optimal: fewer misses than lifo at the same K
    lifo5 = _summary(ok(run("generate", MT_ARGS + ["--moe-expert-buffer-size", "5"])))["buffer"]
    assert total["misses"] <= lifo5["misses"]


@pytest.mark.slow
@pytest.mark.parametrize("gating", ["dynamic", "static"])
def test_eval_lm_buffered_equals_resident(gating):
    args = LM_ARGS + ["--moe-gating", gating, "--moe-eval-capacity-token-fraction", "1.0"]
    plain = ok(run("eval-lm", args))
    buffered = ok(run("eval-lm", args + ["--moe-expert-buffer-size", "4", "--moe-buffer-policy", "lru"]))
    assert _PPL.search(plain).group(0) == _PPL.search(buffered).group(0)
    s = _summary(buffered)
    for name, layer in s["layers"].items():
        b = layer["buffer"]
        assert b["slots"] == 4 and b["device_bytes_all_resident"] == 4 * b["device_bytes_buffered"]
        assert b["hits"] + b["misses"] == b["lookups"] > 0
        assert sum(1 for c in layer["expert_counts"] if c) <= b["lookups"]


@pytest.mark.slow
def test_buffer_flags_exit_with_one_clear_line(tmp_path):
    other = tmp_path / "mt.npz"  # a trace of another model (the MT model's layers)
    write_trace(str(other), RoutingTrace(16, 2, ["encoder.layers.1.moe_layer"], [0], [1], [[0, 1]]))
    cases = [
        (["--moe-expert-buffer-size", "17"], "--moe-expert-buffer-size must be between 1 and the 16 experts per rank"),
        (["--moe-expert-buffer-size", "-1"], "--moe-expert-buffer-size must be a finite integer in [0, "),
        (["--moe-expert-buffer-size", "2", "--moe-buffer-policy", "mru"], "unknown --moe-buffer-policy 'mru'"),
        (["--moe-expert-buffer-size", "2", "--moe-buffer-policy", "belady"], "give --moe-buffer-trace PATH"),
        (["--moe-expert-buffer-size", "2", "--moe-buffer-policy", "belady", "--moe-buffer-trace", other],
         "was recorded on MoE layers encoder.layers.1.moe_layer but this model has decoder.layers.1.moe_layer"),
    ]
    for flags, message in cases:
        proc = run("eval-lm", LM_ARGS + flags)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
        assert message in last and last.startswith("fairseq-eval-lm: error:"), last
    proc = run("train", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--arch",
                         "transformer_lm_moe_small", "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64",
                         "--max-tokens", "1024", "--max-update", "1", "--optimizer", "adam", "--lr", "1e-3", "--cpu",
                         "--save-dir", tmp_path / "train", "--moe-expert-buffer-size", "2"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--moe-expert-buffer-size is for inference" in proc.stderr.strip().splitlines()[-1]


def test_simulator_replays_traces_through_the_store_policies(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import simulate_buffering

    # two batches: layer 0 (encoder) then two decoder calls each; 5 experts, top-1
    calls = [(0, [[0], [1], [2]]), (1, [[3]]), (1, [[4], [3]]), (0, [[0], [1]]), (1, [[3]]), (1, [[4]])]
    trace = RoutingTrace(5, 1, ["encoder.layers.0.moe_layer", "decoder.layers.0.moe_layer"], [c[0] for c in calls],
                         [len(c[1]) for c in calls], [row for c in calls for row in c[1]])
    path = tmp_path / "mt_toy.npz"
    write_trace(str(path), trace)
    res = simulate_buffering.run([str(path)], sorted(POLICIES), sizes=[1, 2])
    dec = res["groups"]["MT decoder"]
    # decoder lookups [3], [3, 4], [3], [4]; K=1: lru misses 3, 4(evict 3)... by hand
    assert dec["belady"][1]["lookups"] == 5
    assert dec["lru"][1]["misses"] == _misses("lru", [[3], [3, 4], [3], [4]], K=1)
    assert dec["belady"][2]["misses"] == 2 and dec["belady"][2]["miss_rate"] == 0.4  # compulsory only
    # per batch: batch 1 holds calls 2-3 (3 lookups, 2 misses), batch 2 calls 5-6 (2 lookups, 0 misses) at K=2
    assert dec["belady"][2]["batch_worst"] == round(2 / 3, 6) and dec["belady"][2]["batch_avg"] == round(1 / 3, 6)
    enc = res["groups"]["MT encoder"]
    assert enc["lifo"][2]["lookups"] == 5 and res["gap_to_belady"]["MT decoder"][2]["gap_points"] == 0.0
    # per trace: a second trace (cyclic decoder lookups, where LIFO/LRU/FIFO lose to Belady at K=2) in the same
    # run keeps its own gap, equal to the gap of a run on that trace alone (not the pooled one)
    calls2 = [(0, [[0]])] + [(1, [[e]]) for e in [0, 1, 2] * 4]
    path2 = tmp_path / "mt_cyclic.npz"
    write_trace(str(path2), RoutingTrace(5, 1, trace.layer_names, [c[0] for c in calls2], [len(c[1]) for c in calls2],
                                         [row for c in calls2 for row in c[1]]))
    both = simulate_buffering.run([str(path), str(path2)], sorted(POLICIES), sizes=[1, 2])
    for p in (path, path2):
        alone = simulate_buffering.run([str(p)], sorted(POLICIES), sizes=[1, 2])["gap_to_belady"]
        assert both["gap_to_belady_per_trace"][p.name] == alone
    # cyclic 0,1,2 x4 with K=2, by hand: Belady misses t0-t2, then every other lookup (t4, t6, t8, t10): 7 of 12;
    # LRU/FIFO miss all 12; LIFO keeps 0 and alternates 1/2 in the other slot: 9
    cyc = both["gap_to_belady_per_trace"]["mt_cyclic.npz"]["MT decoder"][2]
    lookups = [[e] for e in [0, 1, 2] * 4]
    assert (_misses("belady", lookups, K=2), _misses("lru", lookups, K=2), _misses("fifo", lookups, K=2),
            _misses("lifo", lookups, K=2)) == (7, 12, 12, 9)
    best = min(simulate_buffering.ONLINE, key=lambda q: _misses(q, lookups, K=2))
    assert cyc["best_online"] == best
    assert 0 < cyc["gap_points"] == round(100 * (_misses(best, lookups, K=2) - 7) / 12, 3) <= round(100 * 2 / 12, 3)
    assert both["gap_to_belady"]["MT decoder"][2] != cyc  # pooled over both traces differs


def test_simulator_merges_the_ranks_of_an_expert_parallel_trace(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import simulate_buffering

    from fairseq_moe_infer.trace import rank_path

    names, layers = ["decoder.layers.0.moe_layer"], [0, 0, 0]
    rank0 = [[[0], [1]], [[0]], [[2]]]  # per call, each token's top-1 choice
    rank1 = [[[3]], [[1], [3]], [[0]]]
    for r, calls in enumerate((rank0, rank1)):
        write_trace(rank_path(str(tmp_path / "mt_ep.npz"), r),
                    RoutingTrace(4, 1, names, layers, [len(c) for c in calls], [t for c in calls for t in c], 2, r))
    both = [a + b for a, b in zip(rank0, rank1)]  # one process holding both ranks' tokens, call by call
    write_trace(str(tmp_path / "mt_one.npz"), RoutingTrace(4, 1, names, layers, [len(c) for c in both],
                                                           [t for c in both for t in c]))
    ep = simulate_buffering.run([str(tmp_path / "mt_ep.npz")], ["lru"], sizes=[1, 2])["groups"]["MT decoder"]
    one = simulate_buffering.run([str(tmp_path / "mt_one.npz")], ["lru"], sizes=[1, 2])["groups"]["MT decoder"]
    assert ep == one and ep["lru"][2]["lookups"] == 3 + 3 + 2  # before: rank 0's lookups alone, 2 + 1 + 1
    assert ep["lru"][2]["misses"] == _misses("lru", [[0, 1, 3], [0, 1, 3], [0, 2]], K=2, E=4)
    pre = simulate_buffering.run_prefetch([str(tmp_path / "mt_ep.npz")], ["lru"], [2], ["none"])
    assert pre["groups"]["MT decoder"]["none"]["lru"][2]["lookups"] == 8


def test_simulator_refuses_bad_input_with_one_line(tmp_path, monkeypatch, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import simulate_buffering

    trace = RoutingTrace(4, 1, ["decoder.layers.0.moe_layer"], [0, 0], [1, 1], [[0], [3]])
    good = tmp_path / "mt_toy.npz"
    write_trace(str(good), trace)
    cut = tmp_path / "mt_cut.npz"
    cut.write_bytes(good.read_bytes()[:40])
    out = str(tmp_path / "sim.json")
    # before: a TraceError / ValueError traceback (the folder one after the whole simulation), K = 5 > E simulated
    for args, line in [([str(cut)], f"simulate_buffering.py: error: {cut} is corrupt or truncated"),
                       ([str(tmp_path / "none.npz")], f"simulate_buffering.py: error: routing trace {tmp_path / 'none.npz'} "
                                                      "does not exist"),
                       ([str(good), "--sizes", "0"], "simulate_buffering.py: error: --sizes 0: a cache size K must be in [1, 4]"),
                       ([str(good), "--sizes", "2", "5"], "simulate_buffering.py: error: --sizes 5: a cache size K"),
                       ([str(good), "--prefetch", "none", "--sizes", "5"], "simulate_buffering.py: error: --sizes 5: a cache"),
                       ([str(good), "--out", str(tmp_path / "no" / "sim.json")],
                        f"simulate_buffering.py: error: --out {tmp_path / 'no' / 'sim.json'}: folder {tmp_path / 'no'} does")]:
        argv = ["simulate_buffering.py"] + args + ([] if "--out" in args else ["--out", out])
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            simulate_buffering.main()
        assert str(e.value).startswith(line), (args, str(e.value))
        assert "\n" not in str(e.value) and not os.path.exists(out)
    monkeypatch.setattr(sys, "argv", ["simulate_buffering.py", str(good), "--sizes", "1"])  # --out is required: the
    with pytest.raises(SystemExit):  # default overwrote the repository's benchmarks/results/buffering_simulation.json
        simulate_buffering.main()
    assert "--out" in capsys.readouterr().err
