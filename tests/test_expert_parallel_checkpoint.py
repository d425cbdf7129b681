"""Expert-parallel checkpoint state over 2 and 4 gloo processes, against hand-computed values.

Each rank holds E / world experts of one MoE layer. Every expert's gradient is the constant
``j + 1`` (j: global expert index), so after one Adam step the moments of expert j are
``(1 - beta1) (j + 1)`` and ``(1 - beta2) (j + 1)^2``. The gathered optimizer state (as saved in a
checkpoint) must hold all E experts in global order; a rank given that full state must keep its
own share; the fp32 EMA copy of all experts must be cut to each rank's share before fairseq's
``EMA.build_fp32_params`` copies it. Rank 1 never steps one of its tensors: it contributes zeros.
"""

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fairseq_moe_infer.moe import EXPERT_PARAMS, MoELayer
from fairseq_moe_infer.training import (
    ema_build_fp32_params,
    gather_ema_fp32,
    gather_optimizer_state,
    slice_optimizer_state,
)

from .helpers import free_port

E, D, F = 4, 6, 8
BETA1, BETA2 = 0.9, 0.999



def _trainer(model, opt):
    return types.SimpleNamespace(model=model, criterion=nn.Module(), _optimizer=opt,
                                 optimizer=types.SimpleNamespace(state_dict=opt.state_dict, optimizer=opt))


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(MoELayer(D, F, E, k=2))
        layer = model[0]
        e_local, offset = layer.experts.num_local_experts, layer.experts.global_offset
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3, betas=(BETA1, BETA2))
        skipped = "fc2_bias" if rank == 1 else None  # no gradient reached it on this rank: no Adam state
        for n, p in model.named_parameters():
            if n.endswith(tuple(EXPERT_PARAMS)):
                if not n.endswith(str(skipped)):
                    ids = torch.arange(offset, offset + e_local, dtype=p.dtype) + 1
                    p.grad = ids.view(-1, *[1] * (p.dim() - 1)).expand_as(p).clone()
            else:
                p.grad = torch.zeros_like(p)
        opt.step()
        trainer = _trainer(model, opt)
        full = gather_optimizer_state(trainer)
        # fp32 EMA copy: every rank's own experts (values: global expert index)
        ema_model = nn.Sequential(MoELayer(D, F, E, k=2))
        fp32 = {k: v.detach().clone() for k, v in ema_model.state_dict().items()}
        for k in fp32:
            if k.split(".")[-1] in EXPERT_PARAMS:
                fp32[k] = (torch.arange(offset, offset + e_local, dtype=torch.float32) + 1).view(
                    -1, *[1] * (fp32[k].dim() - 1)).expand_as(fp32[k]).clone()
        ema = types.SimpleNamespace(get_model=lambda: ema_model, fp32_params=fp32)
        full_ema = gather_ema_fp32(types.SimpleNamespace(ema=ema))
        # resume: every rank loads rank 0's full optimizer state and fp32 EMA copy, then keeps its share
        box = [full, full_ema]
        dist.broadcast_object_list(box, src=0)
        fresh = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(BETA1, BETA2))
        fresh.load_state_dict(box[0])
        slice_optimizer_state(_trainer(model, fresh))
        got = {}
        ema_build_fp32_params(lambda self, sd: got.update(sd), ema, box[1])
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        results[rank] = {
            "full": None if full is None else {names[i]: {k: v for k, v in s.items() if torch.is_tensor(v) and v.dim()}
                                               for i, s in full["state"].items()},
            "full_ema": None if full_ema is None else {k: v for k, v in full_ema.items() if "experts" in k},
            "resumed": {names[i]: {k: v.clone() for k, v in fresh.state[p].items() if v.dim()}
                        for i, p in enumerate(fresh.param_groups[0]["params"])},
            "ema_share": {k: v for k, v in got.items() if "experts" in k},
            "offset": offset, "e_local": e_local,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_optimizer_state_and_fp32_ema_gathered_and_sliced(world):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), results), nprocs=world, join=True)
    results = dict(results)
    full, full_ema = results[0]["full"], results[0]["full_ema"]
    assert all(results[r]["full"] is None for r in range(1, world))
    ids = torch.arange(1, E + 1, dtype=torch.float32)
    for name in EXPERT_PARAMS:
        key = f"0.experts.{name}"
        m, v = full[key]["exp_avg"], full[key]["exp_avg_sq"]
        assert m.shape[0] == E
        g = ids.view(-1, *[1] * (m.dim() - 1)).expand_as(m).clone()
        if name == "fc2_bias":  # rank 1 had no state: its rows are zeros
            per = E // world
            g[per: 2 * per] = 0
        torch.testing.assert_close(m, (1 - BETA1) * g, rtol=1e-6, atol=0)
        torch.testing.assert_close(v, (1 - BETA2) * g * g, rtol=1e-6, atol=0)
        torch.testing.assert_close(full_ema[key], ids.view(-1, *[1] * (m.dim() - 1)).expand_as(m))
        for r in range(world):
            o, n = results[r]["offset"], results[r]["e_local"]
            torch.testing.assert_close(results[r]["resumed"][key]["exp_avg"], m[o: o + n])
            torch.testing.assert_close(results[r]["resumed"][key]["exp_avg_sq"], v[o: o + n])
            torch.testing.assert_close(results[r]["ema_share"][key], full_ema[key][o: o + n])
    # shared parameters: one rank's state, as it is
    assert full["0.gate.wg.weight"]["exp_avg"].shape == (E, D)
