"""Expert placement (logical expert -> physical slots, replicas) and the placement planner.

The map's contract: any valid placement, with or without replicas, computes the same layer
output as the contiguous sharding (checked against the single-process layer, also over 2 and 4
gloo processes); replicas get the tokens of their expert split evenly, deterministically; bad
maps are refused with one line. The planner's policies are checked on hand-computed cases and
its bound against brute force.
"""

import itertools
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_moe_infer import placement_planner as pp
from fairseq_moe_infer.moe import MoEConfigError, MoELayer
from fairseq_moe_infer.moe.gate import Routing
from fairseq_moe_infer.moe.placement import LayerPlacement, Placement, load_placement
from fairseq_moe_infer.report import gpu_load_summary

from .helpers import free_port

E, D, F = 8, 16, 24


def _routing(idx, valid):
    idx, valid = torch.tensor(idx), torch.tensor(valid)
    return Routing(idx, torch.full(idx.shape, 0.5), valid, torch.zeros(()), 3, True)


def test_route_splits_a_replicated_experts_choices_evenly_in_choice_order():
    # E=3 on 2 ranks x 2 slots: expert 1 in slots 1 and 3
    p = LayerPlacement([0, 1, 2, 1], num_experts=3, world_size=2)
    r = p.route(_routing([[1, 0], [1, 2], [2, 1], [1, 0]], [[True, True]] * 3 + [[True, False]]))
    # expert 1's choices, token-major: t0c0 -> slot 1, t1c0 -> slot 3, t2c1 -> slot 1, t3c0 -> slot 3
    assert r.expert_indices[:, 0].tolist() == [1, 3, 2, 3]
    assert r.expert_indices[:3, 1].tolist() == [0, 2, 1]
    assert r.num_experts == 4 and p.local_experts(0) == [0, 1] and p.local_experts(1) == [2, 1]
    assert p.logical_counts(torch.tensor([5, 2, 7, 3])).tolist() == [5, 5, 7]
    assert p.rank_loads(torch.tensor([5, 2, 7, 3])).tolist() == [7, 10]
    ident = LayerPlacement([0, 1, 2], 3, 1)
    routing = _routing([[1, 0]], [[True, True]])
    assert ident.route(routing) is routing  # identity: nothing changes


def test_bad_maps_are_refused_with_one_line(tmp_path):
    with pytest.raises(MoEConfigError, match=r"expert\(s\) \[2\] have no slot"):
        LayerPlacement([0, 1, 1, 0], 3, 2)
    with pytest.raises(MoEConfigError, match="5 slots, expected"):
        Placement(2, 2, 3, {"a": [0, 1, 2, 0, 1]})
    with pytest.raises(MoEConfigError, match=r"not an expert id in \[0, 3\)"):
        Placement(2, 2, 3, {"a": [0, 1, 2, 3]})
    p = Placement(2, 2, 3, {"a": [0, 1, 2, 1]})
    with pytest.raises(MoEConfigError, match="world size 2, this run has 4"):
        p.check_model(["a"], 3, 4)
    with pytest.raises(MoEConfigError, match="for 3 experts, the model has 4"):
        p.check_model(["a"], 4, 2)
    with pytest.raises(MoEConfigError, match="lists 1 MoE layers, the model has 2"):
        p.check_model(["a", "b"], 3, 2)
    path = tmp_path / "p.json"
    p.save(str(path))
    assert load_placement(str(path)) == p
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(MoEConfigError, match="not a placement file"):
        load_placement(str(path))
    path.write_text("{")
    with pytest.raises(MoEConfigError, match="cannot read it as JSON"):
        load_placement(str(path))
    for msg in [str(e) for e in [MoEConfigError("x")]]:
        assert "\n" not in msg
    # JSON true / false were taken as expert / world size 1 / 0 (bool is an int in Python)
    with pytest.raises(MoEConfigError, match=r"slot expert True is not an expert id in \[0, 3\)"):
        Placement(2, 2, 3, {"a": [0, 1, 2, True]})
    with pytest.raises(MoEConfigError, match="world_size must be a positive integer, got True"):
        Placement(True, 4, 3, {"a": [0, 1, 2, 1]})


def _layer(gating, placement=None, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(D, F, E, k=2, gating=gating, eval_capacity_token_fraction=1.0, placement=placement).double()
    with torch.no_grad():
        layer.gate.wg.weight.mul_(3.0)
    return layer.eval()


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    n = 40 + 7 * rank
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(n, dtype=torch.bool)
    pad[::9] = True
    return x, pad


# world 1 with replicas; world 2 with one spare slot per rank; world 4 with 3 slots per rank
SLOTS = {1: [3, 0, 1, 5, 2, 4, 6, 7, 3, 3], 2: [7, 0, 3, 1, 3, 2, 6, 4, 5, 7], 4: [1, 7, 3, 0, 0, 2, 4, 5, 1, 6, 3, 0]}


@pytest.mark.parametrize("gating", ["dynamic", "static"])
def test_slots_load_their_logical_experts_and_the_output_is_unchanged(gating):
    ref = _layer(gating)
    placed = _layer(gating, LayerPlacement(SLOTS[1], E, 1), seed=5)
    placed.load_state_dict(ref.state_dict())
    full = ref.state_dict()
    for name in ("fc1_weight", "fc2_bias"):
        assert torch.equal(getattr(placed.experts, name).detach(), full[f"experts.{name}"][SLOTS[1]])
    x, pad = _inputs(0)
    y_ref, y = ref(x, pad), placed(x, pad)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    assert placed.eval_totals() == ref.eval_totals()  # logical expert counts, routed, dropped
    kept = ref.eval_totals()["routed"]
    assert placed.eval_rank_loads().tolist() == [[kept]]
    # replicated expert 3 (slots 0, 8, 9): its choices split 3 ways, at most one apart
    slot_counts = placed.last_stats  # logical counts in stats; recompute the slot split directly
    routing = placed.placement.route(placed.gate(x, pad))
    per_slot = torch.bincount(routing.expert_indices[routing.valid], minlength=10)
    assert per_slot[[0, 8, 9]].sum() == slot_counts.expert_counts[3]
    assert per_slot[[0, 8, 9]].max() - per_slot[[0, 8, 9]].min() <= 1



def _worker(rank, world, port, gating, full_state, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = _layer(gating, LayerPlacement(SLOTS[world], E, world), seed=7)
        layer.load_state_dict(full_state)
        x, pad = _inputs(rank)
        if gating == "static":  # fairseq pads every rank's batch to the largest
            n_max = _inputs(world - 1)[0].shape[0]
            x = torch.cat([x, torch.zeros(n_max - x.shape[0], D, dtype=x.dtype)])
            pad = torch.cat([pad, torch.ones(n_max - pad.shape[0], dtype=torch.bool)])
        y = layer(x, pad)
        results[rank] = {"y": y[: _inputs(rank)[0].shape[0]].detach(), "gpu_load": gpu_load_summary(layer),
                         "slots": layer.experts.num_local_experts, "counts": layer.eval_totals()["expert_counts"]}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,gating", [(2, "dynamic"), (2, "static"), pytest.param(4, "dynamic", marks=pytest.mark.slow)])
def test_expert_parallel_with_placement_equals_single_process(world, gating):
    ref = _layer(gating)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), gating, ref.state_dict(), results), nprocs=world, join=True)
    total_slot = torch.zeros(len(SLOTS[world]), dtype=torch.long)
    p = LayerPlacement(SLOTS[world], E, world)
    for rank in range(world):
        x, pad = _inputs(rank)
        torch.testing.assert_close(results[rank]["y"], ref(x, pad), rtol=1e-12, atol=1e-14)
        assert results[rank]["slots"] == len(SLOTS[world]) // world
        r = p.route(ref.gate(x, pad))
        total_slot += torch.bincount(r.expert_indices[r.valid], minlength=len(SLOTS[world]))
    expected = p.rank_loads(total_slot).tolist()  # all ranks' choices per GPU, from the map alone
    for rank in range(world):
        g = results[rank]["gpu_load"]
        assert g["tokens_per_gpu"] == expected and g["world_size"] == world and g["batches"] == 1
        assert g["step_max_over_mean"] == pytest.approx(max(expected) / (sum(expected) / world))


# ---- planner -----------------------------------------------------------------------------


def test_contiguous_and_greedy_by_hand():
    x = np.array([[4, 3, 2, 1]])
    assert pp.plan_layer("contiguous", x, 2, 2) == [0, 1, 2, 3]
    # greedy: e0 -> g0 (4), e1 -> g1 (3), e2 -> g1 (5), e3 -> g0 (5)
    assert pp.plan_layer("greedy", x, 2, 2) == [0, 3, 1, 2]
    assert pp.gpu_loads(x, [0, 3, 1, 2], 2).tolist() == [[5.0, 5.0]]
    assert pp.load_ratios(pp.gpu_loads(x, [0, 1, 2, 3], 2))["step_max_over_mean"] == pytest.approx(7 / 5)


def test_replicate_by_hand():
    x = np.array([[4, 3, 2, 1]])
    # spares: e0 (4/1), then e1 (3/1 > 4/2); replicas of load 2, 2, 2 (e2), 1.5, 1.5, 1 packed greedily,
    # a second replica of an expert never on the GPU holding the first while another has room
    assert pp.replica_counts(np.array([4.0, 3, 2, 1]), 6).tolist() == [2, 2, 1, 1]
    plan = pp.plan_layer("replicate", x, 2, 3)
    assert plan == [0, 2, 1, 0, 1, 3]
    assert pp.gpu_loads(x, plan, 2).tolist() == [[5.5, 4.5]]


def test_anti_correlation_separates_co_active_experts():
    x = np.array([[4, 0, 4, 0], [0, 4, 0, 4]])  # e0, e2 active together; e1, e3 together
    greedy, anti = pp.plan_layer("greedy", x, 2, 2), pp.plan_layer("anti_correlation", x, 2, 2)
    assert greedy == [0, 2, 1, 3] and pp.load_ratios(pp.gpu_loads(x, greedy, 2))["step_max_over_mean"] == 2.0
    assert anti == [0, 3, 1, 2] and pp.load_ratios(pp.gpu_loads(x, anti, 2))["step_max_over_mean"] == 1.0


def test_load_ratios_by_hand():
    r = pp.load_ratios(np.array([[3, 1], [1, 1], [0, 0]]))
    assert r == {"step_max_over_mean": 4 / 3, "mean_batch_max_over_mean": 1.25, "worst_batch_max_over_mean": 1.5,
                 "run_max_over_mean": 4 / 3, "batches": 2}


def test_bound_is_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 20, size=(6, 6))
    best = min(
        pp.load_ratios(pp.gpu_loads(x, list(perm), 3))["step_max_over_mean"]
        for perm in itertools.permutations(range(6))
    )
    b = pp.best_balance_bound(x, 3, 2)
    assert b["exact"] and b["bound"] == pytest.approx(best)
    assert b["closed_form"] <= best + 1e-12 and b["run_level"] <= best + 1e-12
    greedy = pp.load_ratios(pp.gpu_loads(x, pp.plan_layer("greedy", x, 3, 2), 3))["step_max_over_mean"]
    assert greedy >= best - 1e-12


def test_planner_refuses_too_few_slots_and_unknown_policies():
    with pytest.raises(ValueError, match="cannot hold 4 experts"):
        pp.plan_layer("greedy", np.ones((1, 4)), 1, 2)
    with pytest.raises(ValueError, match="unknown placement policy"):
        pp.plan_layer("best", np.ones((1, 4)), 2, 2)


def _write(path, choices_per_call, layer_of_call, world=1, rank=0):
    from fairseq_moe_infer.trace import RoutingTrace, write_trace

    choices = np.concatenate([np.array(c, dtype=np.int16).reshape(-1, 1) for c in choices_per_call])
    write_trace(str(path), RoutingTrace(4, 1, ["decoder.layers.0.moe_layer", "decoder.layers.1.moe_layer"],
                                        layer_of_call, [len(c) for c in choices_per_call], choices, world, rank))


def test_trace_counts_sum_expert_parallel_ranks_call_by_call_and_the_script_writes_a_usable_map(tmp_path, capsys):
    from fairseq_moe_infer.trace import rank_path

    # rank 0 and rank 1 of a 2-process run, two calls per layer each; step i = both ranks' i-th call
    _write(tmp_path / "t.npz", [[0, 0, 1], [2], [3, 3], [1]], [0, 1, 0, 1], world=2, rank=0)
    _write(rank_path(str(tmp_path / "t.npz"), 1), [[0], [2, 2], [3], [0]], [0, 1, 0, 1], world=2, rank=1)
    counts = pp.trace_layer_counts([str(tmp_path / "t.npz")])
    assert counts["decoder.layers.0.moe_layer"].tolist() == [[3, 1, 0, 0], [0, 0, 0, 3]]
    assert counts["decoder.layers.1.moe_layer"].tolist() == [[0, 0, 3, 0], [1, 1, 0, 0]]
    import runpy

    out = tmp_path / "map.json"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "plan_placement.py")
    argv = ["plan_placement.py", "--trace", str(tmp_path / "t.npz"), "--heldout", str(tmp_path / "t.npz"),
            "--gpus", "2", "--slots", "3", "--policy", "replicate", "--out", str(out)]
    import sys

    old, sys.argv = sys.argv, argv
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = old
    text = capsys.readouterr().out
    assert "held-out traces: per-batch max/mean GPU load decoder" in text
    placement = load_placement(str(out))
    assert placement.world_size == 2 and placement.slots_per_rank == 3 and placement.extra["policy"] == "replicate"
    placement.check_model(list(counts), 4, 2)
    # a rank file of another run (another number of calls of a layer): refused, not cut to the shorter one
    from fairseq_moe_infer.trace import TraceError

    _write(rank_path(str(tmp_path / "t.npz"), 1), [[0], [2, 2], [3]], [0, 1, 0], world=2, rank=1)
    with pytest.raises(TraceError, match=r"t.npz.rank1 holds 1 calls of decoder.layers.1.moe_layer but .*t.npz holds 2: "
                                         "the files are of different runs"):
        pp.trace_layer_counts([str(tmp_path / "t.npz")])


def test_plan_placement_script_refuses_bad_input_with_one_line(tmp_path, capsys):
    import sys

    from fairseq_moe_infer.trace import RoutingTrace, write_trace

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import plan_placement

    _write(tmp_path / "t.npz", [[0, 0, 1], [2], [3, 3], [1]], [0, 1, 0, 1])
    # the same MoE layers, 8 experts: before, its held-out ratios were printed for the 4-expert map (exit 0)
    write_trace(str(tmp_path / "e8.npz"), RoutingTrace(8, 1, ["decoder.layers.0.moe_layer", "decoder.layers.1.moe_layer"],
                                                       [0, 1], [2, 1], np.array([[7], [6], [5]], dtype=np.int16)))
    out = tmp_path / "map.json"
    t = ["--trace", str(tmp_path / "t.npz")]
    for args, line in [(t + ["--heldout", str(tmp_path / "e8.npz"), "--gpus", "2"],
                        "plan_placement.py: error: the held-out traces are of another model (8 experts per MoE layer, "
                        "the planning traces 4)"),
                       (t + ["--gpus", "0"], "plan_placement.py: error: need at least one GPU and one slot per GPU, got "
                                             "--gpus 0"),  # was: ZeroDivisionError traceback
                       (t + ["--gpus", "2", "--slots", "0"], "plan_placement.py: error: need at least one GPU and one "
                                                             "slot per GPU"),  # was: silently the default S = E / G
                       (t + ["--gpus", "2", "--out", str(tmp_path / "no" / "map.json")],  # was: traceback after planning
                        f"plan_placement.py: error: --out {tmp_path / 'no' / 'map.json'}: folder {tmp_path / 'no'} does "
                        "not exist")]:
        with pytest.raises(SystemExit) as e:
            plan_placement.main(args + ["--out", str(out)] if "--out" not in args else args)
        assert str(e.value).startswith(line), (args, str(e.value))
        assert not out.exists() and "held-out traces:" not in capsys.readouterr().out


def test_local_search_fixes_greedys_hand_case_and_finds_the_brute_force_optimum():
    """Greedy balances run totals: experts 0 and 2 are active in batch 0, 1 and 3 in batch 1, all with equal
    totals, so greedy pairs (0, 2) and (1, 3) and each batch runs on one GPU (max/mean 2.0). The swap local
    search splits them (1.0). On 8 random skewed layers (E = 8, G = 2) it reaches the optimum found by
    enumerating all 70 choices of GPU 0's four experts, and is never worse than greedy."""
    x = np.array([[10, 0, 10, 0], [0, 10, 0, 10]], dtype=float)
    g = pp.plan_layer("greedy", x, 2, 2)
    r = pp.plan_layer("greedy", x, 2, 2, local_search=True)
    assert pp.load_ratios(pp.gpu_loads(x, g, 2))["step_max_over_mean"] == 2.0
    assert pp.load_ratios(pp.gpu_loads(x, r, 2))["step_max_over_mean"] == 1.0 and sorted(r) == [0, 1, 2, 3]
    for seed in range(8):
        rng = np.random.default_rng(seed)
        c = rng.poisson(rng.gamma(0.7, 5, size=(1, 8)), size=(30, 8)).astype(float)

        def cost(plan):
            return pp.gpu_loads(c, plan, 2).max(1).sum()

        best = min(cost(list(a) + [e for e in range(8) if e not in a]) for a in itertools.combinations(range(8), 4))
        refined = pp.plan_layer("greedy", c, 2, 4, local_search=True)
        assert sorted(refined) == list(range(8))
        assert cost(refined) == best <= cost(pp.plan_layer("greedy", c, 2, 4))


def test_local_search_time_limit_reaches_refine_by_swaps(monkeypatch):
    """plan_layer / plan_placement hand ``search_time_s`` to refine_by_swaps (default 5 s per layer)."""
    seen = []
    real = pp.refine_by_swaps

    def spy(counts, plan, gpus, **kw):
        seen.append(kw.get("time_limit_s"))
        return real(counts, plan, gpus, **kw)

    monkeypatch.setattr(pp, "refine_by_swaps", spy)
    x = np.array([[10, 0, 10, 0], [0, 10, 0, 10]], dtype=float)
    assert sorted(pp.plan_layer("greedy", x, 2, 2, local_search=True, search_time_s=0.5)) == [0, 1, 2, 3]
    pp.plan_layer("greedy", x, 2, 2, local_search=True)
    pp.plan_placement("greedy", {"a": x, "b": x}, 2, 2, local_search=True, search_time_s=1.5)
    pp.plan_placement("greedy", {"a": x}, 2, 2)  # no local search: not called
    assert seen == [0.5, 5.0, 1.5, 1.5]
