"""Dispatchers: move routed tokens to their experts and combine the results.

Each dispatcher follows Tutel's pipeline: encode (gather tokens per expert) ->
all-to-all -> experts -> all-to-all back -> decode (weighted combine). They
differ in how tokens are laid out:

* :class:`StaticDispatcher` -- fairseq / GShard static gating. Every expert gets
  a fixed capacity C (training: ``int(capacity_factor * k * ceil(T / E))``;
  evaluation: ``ceil(eval_capacity_token_fraction * T)``), choices past it are
  dropped (first choices take precedence over second choices, then token
  order), and dispatch/combine go through one-hot [T, E, C] tensors and dense
  matmuls, exactly as ``fairseq/modules/moe/moe_layer.py`` does. Memory and time
  grow with T * E * C.
* :class:`DynamicDispatcher` -- dynamic gating (Huang et al. 2024, Sec. 4):
  assignments are sorted by expert, each expert receives exactly its tokens, no
  token is dropped, and with expert parallelism the per-expert counts are
  exchanged first so the all-to-all moves only routed rows. No [T, E, C]
  tensor exists.

Given the same :class:`~fairseq_moe_infer.moe.gate.Routing`, the two compute
the same output whenever the static one drops nothing.
"""

import math
from dataclasses import dataclass
from typing import Dict, Type

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .comm import all_to_all, exchange_counts
from .experts import Experts
from .gate import Routing
from .kernels import fused_available, unpermute_combine
from .options import check_moe_options
from .registry import class_registrar


@dataclass
class DispatchStats:
    """Per-forward counters, all on the input's device (no host sync).

    Attributes:
        expert_counts: [E] int64, assignments each global expert processed
            (kept choices of this rank's tokens).
        routed: scalar int64, valid choices (non-padding, not sampled out).
        dropped: scalar int64, valid choices dropped for lack of capacity.
        capacity: C per expert (static) or -1 (dynamic).
    """

    expert_counts: Tensor
    routed: Tensor
    dropped: Tensor
    capacity: int


class Dispatcher:
    """Base class; subclasses implement :meth:`__call__`."""

    name = ""

    def __call__(self, x: Tensor, routing: Routing, experts: Experts, group, training: bool):
        """Run the experts on routed tokens.

        Args:
            x: [T, d] tokens.
            routing: the gate's decision for the T tokens.
            experts: this rank's experts (E_local = E / world).
            group: expert-parallel process group, or None on one process.
            training: the layer's training flag (selects the capacity rule).

        Returns:
            (y [T, d] in x's dtype, :class:`DispatchStats`).
        """
        raise NotImplementedError


DISPATCHERS: Dict[str, Type[Dispatcher]] = {}


register_dispatcher = class_registrar(DISPATCHERS, "--moe-gating")


def build_dispatcher(name: str, capacity_factor: float = 1.0, eval_capacity_token_fraction: float = 0.25) -> Dispatcher:
    """Dispatcher for ``--moe-gating NAME``.

    Raises:
        MoEConfigError: unknown name or a capacity option that is not finite or out of range
            (:func:`~fairseq_moe_infer.moe.options.check_moe_options`).
    """
    check_moe_options(moe_gating=name, moe_capacity_factor=capacity_factor,
                      moe_eval_capacity_token_fraction=eval_capacity_token_fraction)
    if name == "static":
        return StaticDispatcher(capacity_factor, eval_capacity_token_fraction)
    return DISPATCHERS[name]()


_OOM_ERROR = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # CUDA; the CPU allocator raises RuntimeError


class MoEOutOfMemoryError(RuntimeError):
    """Static gating ran out of memory at evaluation; the message names the batch and the fix."""


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


@register_dispatcher("static")
class StaticDispatcher(Dispatcher):
    """fairseq/GShard static gating with a fixed per-expert capacity.

    Args:
        capacity_factor: training capacity is ``int(capacity_factor * k * ceil(T / E))``
            (fairseq: top-1 ``int(cf * ceil(T / E))``, top-2 ``2 * ceil(T / E)``).
        eval_capacity_token_fraction: evaluation capacity is
            ``ceil(fraction * T)``; 0 uses the training rule (fairseq semantics).

    With expert parallelism T is the largest token count over the ranks (fairseq
    pads every rank's batch to it), so all ranks agree on C.
    """

    def __init__(self, capacity_factor: float = 1.0, eval_capacity_token_fraction: float = 0.25):
        self.capacity_factor = capacity_factor
        self.eval_capacity_token_fraction = eval_capacity_token_fraction

    def capacity(self, num_tokens: int, num_experts: int, k: int, training: bool) -> int:
        """Per-expert capacity C for T=num_tokens tokens (see class docstring)."""
        if not training and self.eval_capacity_token_fraction > 0:
            return math.ceil(self.eval_capacity_token_fraction * num_tokens)
        return int(self.capacity_factor * k * math.ceil(num_tokens / num_experts))

    def __call__(self, x, routing, experts, group, training):
        try:
            return self._dispatch(x, routing, experts, group, training)
        except (_OOM_ERROR, MemoryError, RuntimeError) as e:
            message = str(e).lower()
            oom = isinstance(e, (_OOM_ERROR, MemoryError)) or "out of memory" in message or "can't allocate memory" in message
            if training or not oom:
                raise  # in training, fairseq's trainer catches OOM itself and skips the batch
            problem = self.out_of_memory_message(x.shape[0], routing.num_experts, routing.k, x.element_size())
            from ..cli import exit_with_error, in_fairseq_tool

            if in_fairseq_tool():
                exit_with_error(problem)
            raise MoEOutOfMemoryError(problem) from None

    def out_of_memory_message(self, num_tokens: int, num_experts: int, k: int, element_size: int) -> str:
        """The one line for an out-of-memory error at evaluation (names the batch and the fix)."""
        C = self.capacity(num_tokens, num_experts, k, training=False)
        mib = num_tokens * num_experts * max(C, 1) * element_size / 2**20
        return (
            f"out of memory in static gating: a batch of {num_tokens} tokens builds [tokens, experts, capacity] = "
            f"[{num_tokens}, {num_experts}, {C}] dispatch tensors ({mib:.0f} MiB each); use --moe-gating dynamic "
            "(no such tensors, drops nothing) or a smaller --max-tokens / --batch-size"
        )

    def _dispatch(self, x, routing, experts, group, training):
        num_tokens, d = x.shape
        E, k = routing.num_experts, routing.k
        world = _world(group)
        t_max = num_tokens
        if world > 1:
            t = torch.tensor([num_tokens], device=x.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            t_max = int(t.item())
        C = self.capacity(t_max, E, k, training)
        if t_max == 0:  # no token on any rank (e.g. an empty batch): capacity 0, nothing to route
            zero = routing.valid.sum()
            return x.new_zeros(0, d), DispatchStats(x.new_zeros(E, dtype=torch.long), zero, zero, 0)

        # locations in the capacity buffer: cumsum over tokens, second choices after all first ones
        masks = [F.one_hot(routing.expert_indices[:, i], E) * routing.valid[:, i, None] for i in range(k)]
        kept_masks, locations, offset = [], [], 0
        for m in masks:
            loc = torch.cumsum(m, dim=0) - 1 + offset
            offset = offset + m.sum(dim=0, keepdim=True)
            kept_masks.append(m * (loc < C))
            locations.append((loc * kept_masks[-1]).sum(dim=1))
        kept = torch.stack([m.sum(dim=1) > 0 for m in kept_masks], dim=1)
        weights = routing.combine_weights(kept)

        combine = x.new_zeros(())  # [T, E, C] one-hot combine tensor, as fairseq builds it
        for i in range(k):
            gate_se = weights[:, i, None] * kept_masks[i].to(weights.dtype)
            loc_sc = F.one_hot(locations[i], C).to(weights.dtype)
            combine = combine + torch.bmm(gate_se.unsqueeze(-1), loc_sc.unsqueeze(1))
        combine = combine.to(x.dtype)
        dispatch_mask = combine.bool().to(x.dtype)

        dispatched = torch.mm(dispatch_mask.permute(1, 2, 0).reshape(E * C, num_tokens), x)  # [E*C, d]
        if world > 1:
            dispatched = all_to_all(dispatched, group)  # rows: (source rank, local expert, c)
            e_local = experts.num_local_experts
            local_in = dispatched.view(world, e_local, C, d).transpose(0, 1).reshape(e_local, world * C, d)
            local_out = experts.forward_padded(local_in)
            back = local_out.view(e_local, world, C, d).transpose(0, 1).reshape(E * C, d)
            expert_out = all_to_all(back, group)
        else:
            expert_out = experts.forward_padded(dispatched.view(E, C, d)).reshape(E * C, d)
        y = torch.mm(combine.view(num_tokens, E * C), expert_out)

        routed = routing.valid.sum()
        expert_counts = sum(m.sum(dim=0) for m in kept_masks)
        return y, DispatchStats(expert_counts, routed, routed - kept.sum(), C)


@register_dispatcher("dynamic")
class DynamicDispatcher(Dispatcher):
    """Dynamic gating: sort assignments by expert, exact per-expert sizes, no dropping.

    Single process: no host synchronisation (grouped GEMM offsets stay on the
    device), so the layer can be captured in a CUDA graph. At inference on CUDA
    the un-permute, weighting and sum over the k choices are one Triton kernel
    (:func:`~fairseq_moe_infer.moe.kernels.unpermute_combine`). Expert parallel: one exchange of per-expert counts (host sync for
    the split sizes), then variable-size ``all_to_all_single`` there and back.
    """

    def __call__(self, x, routing, experts, group, training):
        num_tokens, d = x.shape
        E, k = routing.num_experts, routing.k
        flat_valid = routing.valid.t().reshape(-1)  # choice-major: first choices first
        key = torch.where(flat_valid, routing.expert_indices.t().reshape(-1), E)
        order = torch.argsort(key, stable=True)
        sorted_key = key[order]
        # per-expert counts without a host sync (bincount would read the max back)
        counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(0, key, torch.ones_like(key))[:E]
        rows = x[order % num_tokens]  # token of assignment j is j % T

        world = _world(group)
        if world == 1:
            y_sorted = experts.forward_grouped(rows, counts, sorted_key)
        else:
            y_sorted = self._expert_parallel(rows, counts, experts, group, world)

        weights = routing.combine_weights(routing.valid).t().reshape(-1).to(x.dtype)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        if fused_available(y_sorted):
            y = unpermute_combine(y_sorted, inverse, weights, k)
        else:
            y = (y_sorted[inverse] * weights[:, None]).view(k, num_tokens, d).sum(dim=0)
        routed = flat_valid.sum()
        return y, DispatchStats(counts, routed, torch.zeros_like(routed), -1)

    @staticmethod
    def _expert_parallel(rows: Tensor, counts: Tensor, experts: Experts, group, world: int) -> Tensor:
        e_local = experts.num_local_experts
        recv_counts = exchange_counts(counts, group)  # [world * E_local]
        host = torch.stack([counts, recv_counts]).cpu()
        in_splits = host[0].view(world, e_local).sum(1).tolist()
        out_splits = host[1].view(world, e_local).sum(1).tolist()
        n_send = sum(in_splits)
        recv = all_to_all(rows[:n_send], group, in_splits, out_splits)  # (source rank, local expert)
        local_e = torch.repeat_interleave(
            torch.arange(e_local, device=rows.device).repeat(world), recv_counts
        )
        perm = torch.argsort(local_e, stable=True)
        local_counts = recv_counts.view(world, e_local).sum(0)  # rows per local expert, from all ranks
        y_local = experts.forward_grouped(recv[perm], local_counts, local_e[perm])
        y_recv = torch.empty_like(y_local)
        y_recv[perm] = y_local
        back = all_to_all(y_recv, group, out_splits, in_splits)
        return torch.cat([back, back.new_zeros(rows.shape[0] - n_send, rows.shape[1])])
