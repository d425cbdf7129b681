"""Expert parallelism over gloo CPU processes equals the single-process layer.

Each rank builds the same MoE layer (same seed), keeps its 1/world share of the
experts (loaded from the full state dict, as from a checkpoint), routes its own
tokens and exchanges them by all-to-all. Every rank's output must equal the
single-process output on the same tokens, for static and dynamic gating, in
evaluation and in training (gradients too).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_moe_infer.moe import MoELayer

from .helpers import free_port

E, D, F, TOKENS = 8, 16, 24, 40



def _inputs(rank: int, fraction: float):
    g = torch.Generator().manual_seed(100 + rank)
    n = TOKENS + 7 * rank  # ranks hold different token counts
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(n, dtype=torch.bool)
    pad[::9] = True
    return x, pad


def _full_layer(gating: str, fraction: float) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, k=2, gating=gating, eval_capacity_token_fraction=fraction).double()
    with torch.no_grad():
        layer.gate.wg.weight.mul_(3.0)
    return layer


def _worker(rank, world, port, gating, fraction, train, full_state, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        layer = MoELayer(D, F, E, k=2, gating=gating, eval_capacity_token_fraction=fraction).double()
        layer.load_state_dict(full_state)  # slices this rank's experts
        layer.train(train)
        if train:
            layer.gate.second_expert_policy = "all"
        x, pad = _inputs(rank, fraction)
        x.requires_grad_(train)
        y = layer(x, pad)
        out = {"y": y.detach(), "dropped": int(layer.last_stats.dropped), "local_experts": layer.experts.num_local_experts}
        if train:
            y.pow(2).sum().backward()
            out["x_grad"] = x.grad
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _run_parallel(world, gating, fraction, train):
    results = mp.Manager().dict()
    full_state = _full_layer(gating, fraction).state_dict()  # built in one process: all E experts
    mp.spawn(_worker, args=(world, free_port(), gating, fraction, train, full_state, results), nprocs=world, join=True)
    return dict(results)


def _single_process(rank, world, gating, fraction, train):
    """Reference: one process, all experts, this rank's tokens; static capacity from the
    largest token count over the ranks (what every rank agrees on)."""
    layer = _full_layer(gating, fraction)
    layer.train(train)
    if train:
        layer.gate.second_expert_policy = "all"
    x, pad = _inputs(rank, fraction)
    x_max, _ = _inputs(world - 1, fraction)
    if gating == "static":  # pad to the largest rank's token count, as fairseq does
        extra = x_max.shape[0] - x.shape[0]
        x = torch.cat([x, torch.zeros(extra, D, dtype=x.dtype)])
        pad = torch.cat([pad, torch.ones(extra, dtype=torch.bool)])
    x.requires_grad_(train)
    y = layer(x, pad)
    n = _inputs(rank, fraction)[0].shape[0]
    grad = None
    if train:
        y[:n].pow(2).sum().backward()
        grad = x.grad[:n]
    return y[:n].detach(), int(layer.last_stats.dropped), grad


@pytest.mark.parametrize("world", [2])
@pytest.mark.parametrize("gating,fraction", [("dynamic", 0.25), ("static", 1.0), ("static", 0.1)])
@pytest.mark.parametrize("train", [False, True])
def test_expert_parallel_equals_single_process(world, gating, fraction, train):
    results = _run_parallel(world, gating, fraction, train)
    for rank in range(world):
        y_ref, dropped_ref, grad_ref = _single_process(rank, world, gating, fraction, train)
        r = results[rank]
        assert r["local_experts"] == E // world
        torch.testing.assert_close(r["y"], y_ref, rtol=1e-10, atol=1e-12)
        assert r["dropped"] == dropped_ref
        if train:
            torch.testing.assert_close(r["x_grad"], grad_ref, rtol=1e-10, atol=1e-12)
    if gating == "static" and fraction == 0.1 and not train:
        assert sum(results[r]["dropped"] for r in range(world)) > 0  # this case really drops


@pytest.mark.slow
@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("gating", ["static", "dynamic"])
def test_expert_parallel_4_and_8_processes(world, gating):
    results = _run_parallel(world, gating, 1.0, False)
    for rank in range(world):
        y_ref, dropped_ref, _ = _single_process(rank, world, gating, 1.0, False)
        torch.testing.assert_close(results[rank]["y"], y_ref, rtol=1e-10, atol=1e-12)
        assert results[rank]["local_experts"] == E // world
