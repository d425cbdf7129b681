"""The MoE layer: gate -> placement -> dispatcher (encode, all-to-all, experts, all-to-all, decode).

It replaces a transformer FFN. Its parts are chosen independently:
the gate (:class:`~fairseq_moe_infer.moe.gate.TopKGate`), the expert placement
(``--moe-placement``: :mod:`~fairseq_moe_infer.moe.placement`, logical expert -> physical
slots; the identity by default), the dispatcher
(``--moe-gating``: :mod:`~fairseq_moe_infer.moe.dispatch`) and the experts
(:class:`~fairseq_moe_infer.moe.experts.Experts`, sharded over the expert-parallel
group). None of them knows another's policy.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import expert_parallel_group
from .dispatch import Dispatcher, DispatchStats, build_dispatcher
from .experts import Experts
from .gate import MoEConfigError, TopKGate
from .placement import LayerPlacement, identity_placement


class ForwardLoadLog:
    """The per-forward GPU loads of one layer ([W] int64 rows, see :meth:`MoELayer.eval_rank_loads`)
    in bounded device memory.

    Rows go into a preallocated device chunk of ``chunk`` rows (a copy, no allocation per forward);
    a full chunk moves to the host as int32 (one device-to-host copy per ``chunk`` forwards, never
    while a CUDA graph is being captured). Cost: 4·W bytes of host memory per MoE forward (the
    per-batch max/mean needs every batch: 0.3 MB for 10,000 sentences of beam-4 decoding at
    W = 2), and a fixed ``chunk``·W·8 bytes of device memory.
    """

    def __init__(self, world: int, device: torch.device, chunk: int = 1024):
        self.world, self.chunk_rows = world, chunk
        self._chunk = torch.zeros(chunk, world, dtype=torch.long, device=device)
        self._host: list = []  # full chunks, [rows, W] int32 numpy (a chunk grown during a capture is longer)
        self._host_rows = 0
        self._n = 0  # rows in the current chunk

    @property
    def device(self) -> torch.device:
        return self._chunk.device

    def __len__(self) -> int:
        return self._host_rows + self._n

    def append(self, row: Tensor) -> None:
        """Add one forward's [W] loads (any integer dtype, on the chunk's device)."""
        if self._n == self.chunk_rows:
            self._flush()
        self._chunk[self._n].copy_(row)
        self._n += 1

    def _flush(self) -> None:
        capturing = self._chunk.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing:  # no host copy inside a capture: grow the device chunk instead
            self._chunk = torch.cat([self._chunk, torch.zeros_like(self._chunk)])
            self.chunk_rows = self._chunk.shape[0]
            return
        self._host.append(self._chunk.to(torch.int32).cpu().numpy())
        self._host_rows += self._n
        self._n = 0

    def zero_from(self, index: int) -> None:
        """Zero rows ``index`` .. end (forwards that must keep their place but count nothing)."""
        start = 0
        for h in self._host:  # chunks may differ in length (one grown during a capture)
            if start + len(h) > index:
                h[max(index - start, 0):] = 0
            start += len(h)
        self._chunk[max(index - start, 0): self._n].zero_()

    def tensor(self) -> Tensor:
        """[forwards, W] int64 on the chunk's device."""
        parts = [torch.from_numpy(h).to(self._chunk.device, torch.long) for h in self._host]
        return torch.cat(parts + [self._chunk[: self._n]])


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer (fairseq MoE branch's ``MOELayer``).

    Args:
        model_dim: d.
        ffn_dim: hidden width f of each expert.
        num_experts: E, over all expert-parallel ranks.
        k: top-k (1 or 2).
        activation_fn / activation_dropout: as the transformer FFN's.
        use_fp32_gate, second_expert_policy, normalize_before_dropping: see
            :class:`~fairseq_moe_infer.moe.gate.TopKGate`.
        gating: dispatcher name (``static`` | ``dynamic``), see :meth:`set_gating`.
        capacity_factor: static gating's training capacity factor.
        eval_capacity_token_fraction: static gating's evaluation capacity as a
            fraction of the batch's tokens (fairseq default 0.25).
        route_padding: route padding tokens like real ones (fairseq MoE branch with its
            default ``--use-moe-pad-mask`` off: padding takes capacity slots and its first
            choices count in the balancing loss; its outputs are not zeroed). Default False:
            padding is routed nowhere and its output is zero (``--use-moe-pad-mask``).
        placement: logical expert -> physical slots (:class:`LayerPlacement` for this
            world size); None = contiguous shards. See also :meth:`set_placement`.

    Raises:
        MoEConfigError: bad gate options, the expert-parallel world size
            does not divide E (without a placement), or a placement for another
            world size or expert count.

    Attributes after each forward:
        l_aux: the balancing loss (scalar tensor).
        last_stats: :class:`~fairseq_moe_infer.moe.dispatch.DispatchStats`.
    Totals over evaluation-mode forwards (on the device, read with
    :meth:`eval_totals`): tokens, routed choices, dropped choices, per-expert counts;
    and per forward, the tokens this rank sent to each expert-parallel rank
    (:meth:`eval_rank_loads`).
    """

    def __init__(
        self,
        model_dim: int,
        ffn_dim: int,
        num_experts: int,
        k: int = 2,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        use_fp32_gate: bool = False,
        second_expert_policy: str = "sampling",
        normalize_before_dropping: bool = False,
        gating: str = "static",
        capacity_factor: float = 1.0,
        eval_capacity_token_fraction: float = 0.25,
        route_padding: bool = False,
        placement: LayerPlacement = None,
    ):
        super().__init__()
        group, world, rank = expert_parallel_group()
        if placement is None and num_experts % world != 0:
            sizes = ", ".join(str(w) for w in range(1, num_experts + 1) if num_experts % w == 0)
            raise MoEConfigError(
                f"expert parallelism needs the world size ({world}) to divide the {num_experts} experts "
                f"(--moe-expert-count); run on {sizes} ranks, or train with an expert count divisible by {world}"
            )
        self.gate = TopKGate(model_dim, num_experts, k, use_fp32_gate, second_expert_policy, normalize_before_dropping)
        self.group, self.rank = group, rank
        self.num_experts = num_experts
        self._expert_args = (model_dim, ffn_dim, activation_fn, activation_dropout)
        self.set_placement(placement or identity_placement(num_experts, world))
        self.capacity_factor = capacity_factor
        self.route_padding = route_padding
        self.dispatcher: Dispatcher = build_dispatcher(gating, capacity_factor, eval_capacity_token_fraction)
        self.l_aux: Optional[Tensor] = None
        self.last_stats: Optional[DispatchStats] = None
        self.graphs = None  # LayerGraphs (set_cuda_graphs) or None: every call eager
        self._last_capacity = -1
        self.register_buffer("_eval_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("_eval_scalars", torch.zeros(3, dtype=torch.long), persistent=False)
        self._eval_rank_loads = ForwardLoadLog(self.placement.world_size, self._eval_counts.device)

    def set_placement(self, placement: LayerPlacement) -> None:
        """Use ``placement`` (logical expert -> physical slots) and rebuild this rank's experts
        for its slots: freshly initialised (:meth:`Experts.reset_parameters`), so load the
        checkpoint afterwards (the moe_* tasks set it in ``build_model``, before fairseq loads
        the weights); each slot then loads its logical expert's weights.

        Raises:
            MoEConfigError: a placement for another expert count or world size.
        """
        world = 1 if self.group is None else dist.get_world_size(self.group)
        if placement.num_experts != self.num_experts or placement.world_size != world:
            raise MoEConfigError(
                f"placement for {placement.num_experts} experts on {placement.world_size} ranks, "
                f"the layer has {self.num_experts} experts on {world}"
            )
        d, f, act, drop = self._expert_args
        old = getattr(self, "experts", None)
        device = old.fc1_weight.device if old is not None else None
        dtype = old.fc1_weight.dtype if old is not None else None
        local = placement.local_experts(self.rank)
        self.experts = Experts(d, f, len(local), act, drop, self.num_experts, local[0], expert_index=local)
        if old is not None:
            self.experts.to(device=device, dtype=dtype)
            placement = placement.to(device)
        self.placement = placement

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Apply the layer.

        Args:
            x: [..., d] tokens (flattened in row-major order for routing, so
                capacity priority is the order of that flattening).
            padding_mask: [...] bool (x's leading shape), True at padding.

        Returns:
            [..., d], zero at padding positions (unless ``route_padding``).
        The evaluation counters count non-padding tokens either way; with ``route_padding``
        the routed / dropped choices and tokens per expert include padding's.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        mask = None if padding_mask is None else padding_mask.reshape(-1)
        route_mask = None if self.route_padding else mask
        if self.graphs is not None and self.graphs.applies(tokens, self.training):
            y, l_aux, slot_counts, routed, dropped = self.graphs.run(self.route_and_dispatch, tokens, route_mask,
                                                                         tuple(self.parameters()))
        else:
            y, l_aux, slot_counts, routed, dropped = self.route_and_dispatch(tokens, route_mask)
        stats = DispatchStats(self.placement.logical_counts(slot_counts), routed, dropped, self._last_capacity)
        self.l_aux, self.last_stats = l_aux, stats
        if not self.training:
            n = torch.full((), tokens.shape[0], device=x.device) if mask is None else (~mask).sum()
            self._eval_counts += stats.expert_counts
            self._eval_scalars += torch.stack([n, stats.routed, stats.dropped])  # no host sync (CUDA-graph safe)
            if self._eval_rank_loads.world != self.placement.world_size or \
                    self._eval_rank_loads.device != slot_counts.device:  # placement set or model moved since
                self._eval_rank_loads = ForwardLoadLog(self.placement.world_size, slot_counts.device)
            self._eval_rank_loads.append(self.placement.rank_loads(slot_counts))
        return y.view(shape)

    def route_and_dispatch(self, tokens: Tensor, mask: Optional[Tensor], num_rows: Optional[Tensor] = None) -> tuple:
        """Gate, placement and dispatcher (encode, all-to-all, experts, decode) for ``tokens`` [T, d]
        with ``mask`` [T] bool (True: padding, routed nowhere) or None: the part of :meth:`forward`
        that :class:`~fairseq_moe_infer.moe.graphs.LayerGraphs` captures (no side effects on the
        layer's counters). ``num_rows``: scalar int64 tensor, the call's rows when ``tokens`` is a
        padded graph bucket (the rest are left out of ``l_aux``), or None (all T rows).

        Returns:
            ``(y [T, d], l_aux scalar, slot_counts [slots] int64, routed scalar int64, dropped scalar
            int64)``: the output, the balancing loss and the choices each physical slot processed.
        """
        routing = self.gate(tokens, mask, num_rows)
        y, stats = self.dispatcher(tokens, self.placement.route(routing), self.experts, self.group, self.training)
        self._last_capacity = stats.capacity
        return y, routing.l_aux, stats.expert_counts, stats.routed, stats.dropped

    def set_cuda_graphs(self, max_tokens: int, capture: bool = True, pool=None) -> None:
        """Run inference calls of at most ``max_tokens`` tokens from CUDA graphs, one per power-of-two
        token count (``--moe-cuda-graph-max-tokens``, :mod:`~fairseq_moe_infer.moe.graphs`); 0 = off.

        Raises:
            MoEConfigError: static gating, expert parallelism or expert buffering (not capturable).
        """
        from .graphs import LayerGraphs, check_graphable

        if not max_tokens:
            self.graphs = None
            return
        check_graphable(self)
        self.graphs = LayerGraphs(max_tokens, capture, pool)

    def __getstate__(self):
        # a process group cannot be copied or pickled (fairseq's --store-ema deep-copies the model):
        # keep whether the layer is expert parallel and look the group up again on restore;
        # the last forward's outputs (l_aux, last_stats) are per-step values, not state
        state = dict(self.__dict__)
        state["group"], state["_expert_parallel"] = None, self.group is not None
        state["l_aux"] = state["last_stats"] = None
        state["graphs"] = None  # captured graphs belong to this process's device memory
        state["_eval_rank_loads"] = ForwardLoadLog(self.placement.world_size, self._eval_counts.device)
        return state

    def __setstate__(self, state):
        expert_parallel = state.pop("_expert_parallel", False)
        super().__setstate__(state)
        if expert_parallel:
            self.group = expert_parallel_group()[0]

    def set_gating(self, gating: str, eval_capacity_token_fraction: float = 0.25) -> None:
        """Switch the dispatcher (``--moe-gating``); weights are untouched.

        Raises:
            MoEConfigError: unknown gating or a negative fraction, or static gating with CUDA graphs on.
        """
        self.dispatcher = build_dispatcher(gating, self.capacity_factor, eval_capacity_token_fraction)
        if self.graphs is not None:
            from .graphs import check_graphable

            check_graphable(self)

    def reset_eval_totals(self) -> None:
        """Zero the evaluation counters."""
        self._eval_counts.zero_()
        self._eval_scalars.zero_()
        self._eval_rank_loads = ForwardLoadLog(self.placement.world_size, self._eval_counts.device)

    def eval_counters(self) -> tuple:
        """A copy of the evaluation counters (device tensors: [E] int64 tokens per expert and
        [3] int64 tokens / routed / dropped; and the number of forwards with rank loads),
        for :meth:`restore_eval_counters`."""
        return self._eval_counts.clone(), self._eval_scalars.clone(), len(self._eval_rank_loads)

    def restore_eval_counters(self, saved: tuple) -> None:
        """Put back counters taken by :meth:`eval_counters` (e.g. around a dummy forward that
        must not be reported). Forwards since then keep their place in :meth:`eval_rank_loads`
        (other ranks ran a real forward at the same time) with zero loads."""
        self._eval_counts.copy_(saved[0])
        self._eval_scalars.copy_(saved[1])
        self._eval_rank_loads.zero_from(saved[2])

    def eval_rank_loads(self) -> torch.Tensor:
        """[forwards, W] int64 (device): kept top-k choices this rank sent to each
        expert-parallel rank's slots, per evaluation forward since the last reset
        (summed over the ranks, the tokens each GPU's experts processed in that step)."""
        return self._eval_rank_loads.tensor()

    def eval_expert_counts(self) -> torch.Tensor:
        """[E] int64 device tensor: tokens routed to each expert over the evaluation forwards
        since the last reset (no host sync)."""
        return self._eval_counts

    def eval_totals(self) -> dict:
        """Evaluation counters summed over forwards (host values; syncs once).

        Returns:
            dict with ``tokens`` (non-padding tokens), ``routed`` (valid
            top-k choices), ``dropped`` (choices dropped for capacity) and
            ``expert_counts`` (list of E ints).
        """
        tokens, routed, dropped = self._eval_scalars.tolist()
        return {"tokens": tokens, "routed": routed, "dropped": dropped, "expert_counts": self._eval_counts.tolist()}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, gating={self.dispatcher.name}, route_padding={self.route_padding}, "
                f"slots={self.placement.num_slots}")


def moe_layers(model: nn.Module, named: bool = False):
    """Every :class:`MoELayer` of ``model`` in module order (the one helper for "all MoE layers").

    Args:
        model: any module (a fairseq model, an encoder, a layer).
        named: yield ``(qualified_name, layer)`` pairs instead of layers.

    Returns:
        a list of layers, or of ``(name, layer)`` pairs.
    """
    pairs = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    return pairs if named else [m for _, m in pairs]
