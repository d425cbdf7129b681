"""All-to-all exchanges for expert parallelism (torch.distributed; NCCL or gloo).

Experts are sharded over the ranks of one process group: rank r holds global
experts ``[r * E_local, (r + 1) * E_local)``. Two exchanges are used:

* fixed-size (static gating, fairseq/GShard): every rank sends an equal
  [E_local, C, d] block to every rank;
* variable-size (dynamic gating): per-expert token counts are exchanged first,
  then ``all_to_all_single`` moves exactly the routed rows.

Both are autograd functions whose backward is the reverse exchange.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def expert_parallel_group() -> Tuple[Optional[object], int, int]:
    """The group experts are sharded over: (group, world_size, rank).

    fairseq's MoE branch shards experts over all data-parallel workers; so do
    we. Without an initialised process group this is (None, 1, 0).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    return None, 1, 0


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, in_splits, out_splits, group) -> Tensor:
        ctx.group, ctx.in_splits, ctx.out_splits = group, in_splits, out_splits
        x = x.contiguous()
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.out_splits, ctx.in_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, group, in_splits: Optional[List[int]] = None, out_splits: Optional[List[int]] = None) -> Tensor:
    """Send row block i of ``x`` to rank i; returns the blocks received, in rank order.

    Args:
        x: [N, ...]; with no splits N must divide by the world size (equal blocks).
        in_splits / out_splits: rows sent to / received from each rank (host ints).
    """
    return _AllToAll.apply(x, in_splits, out_splits, group)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """All-to-all of per-expert counts.

    Args:
        counts: [world * E_local] int64, rows this rank sends to each global expert.

    Returns:
        [world * E_local] int64: block r holds the rows rank r sends to each of
        this rank's local experts.
    """
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
